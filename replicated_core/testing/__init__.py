"""Test harness: throwaway PostgreSQL clusters with streaming replicas
(``pgcluster``) and the pytest plugin that offers them as fixtures
(``pytest_plugin``). Runtime code never imports this package."""
