"""Tell a write from a read, given the SQL text the driver is about to receive."""

from __future__ import annotations

import functools
import re

__all__ = ["is_write_sql"]

_WRITE_VERBS = frozenset(
    {
        "ALTER",
        "ANALYZE",
        "CALL",
        "CLUSTER",
        "COMMENT",
        "CREATE",
        "DELETE",
        "DROP",
        "GRANT",
        "INSERT",
        "LOCK",
        "MERGE",
        "REFRESH",
        "REINDEX",
        "REPLACE",
        "REVOKE",
        "TRUNCATE",
        "UPDATE",
        "UPSERT",
        "VACUUM",
    }
)
# Leading white space, comments and opening parentheses, then the first word.
_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*\n?|/\*.*?\*/|\()*([A-Za-z]+)", re.DOTALL)
_ROW_LOCK = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)\b", re.IGNORECASE)
_CTE_WRITE = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
_COPY_FROM = re.compile(r"\bFROM\s+(?:STDIN|'|PROGRAM)", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def is_write_sql(sql: str) -> bool:
    """Whether ``sql`` changes data or schema, or takes row locks.

    Covers what the ORM flushes, Core DML, ``text()`` DML and DDL, ``SELECT ... FOR
    UPDATE``/``FOR SHARE`` and data-modifying ``WITH`` queries. Errs towards "write"
    for a ``WITH`` query that merely mentions such a word. Cached: the compiled cache
    hands the same strings over and over.
    """
    match = _FIRST_WORD.match(sql)
    if match is None:
        return False
    verb = match.group(1).upper()
    if verb in _WRITE_VERBS:
        return True
    if verb == "SELECT" or verb == "TABLE" or verb == "VALUES":
        return _ROW_LOCK.search(sql) is not None
    if verb == "WITH":
        return _CTE_WRITE.search(sql) is not None or _ROW_LOCK.search(sql) is not None
    if verb == "COPY":
        return _COPY_FROM.search(sql) is not None
    return False
