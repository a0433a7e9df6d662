"""Tell a write from a read, given the SQL text the driver is about to receive.

The text is first reduced to its skeleton: string literals, quoted identifiers and
comments are blanked out with PostgreSQL's (or SQLite's) own lexical rules, so that
``WHERE name = 'ready for update'`` or a SQLCommenter comment cannot decide. The
skeleton's keywords then say what kind of statement it is.
"""

from __future__ import annotations

import enum
import functools
import re

__all__ = ["StatementKind", "classify_sql", "is_write_sql", "skeleton"]


class StatementKind(enum.Enum):
    """What a statement does, as far as routing cares."""

    READ = "read"
    # Changes data or schema, or takes row locks: only the primary may run it.
    WRITE = "write"
    # An advisory lock: taken on a replica, it coordinates nothing with the primary.
    LOCK = "lock"
    # Session state (SET, RESET, ATTACH) that would outlive the request on a pooled
    # replica connection and surprise the next request that gets it.
    SESSION = "session"


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
_SESSION_VERBS = frozenset({"RESET", "ATTACH", "DETACH"})

# Where a literal, a quoted identifier or a comment may start: one character class,
# which the regex engine scans for quickly; the token is then read from there.
_PG_START = re.compile(r"""[-'"$/]""")
_SQLITE_START = re.compile(r"""[-'"`\[/]""")
_STANDARD_STRING = re.compile(r"'[^']*(?:''[^']*)*(?:'|\Z)")
# E'' strings (PostgreSQL) take backslash escapes.
_ESCAPE_STRING = re.compile(r"'(?:[^'\\]|\\.|'')*(?:'|\Z)", re.DOTALL)
_IDENTIFIER = re.compile(r'"[^"]*(?:""[^"]*)*(?:"|\Z)')
_BACKTICK_IDENTIFIER = re.compile(r"`[^`]*(?:``[^`]*)*(?:`|\Z)")
_DOLLAR_TAG = re.compile(r"\$(?:[^\W\d]\w*)?\$")
_PG_COMMENT_EDGE = re.compile(r"/\*|\*/")
_IDENTIFIER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")

# The patterns below see the skeleton in upper case.
_FIRST_WORD = re.compile(r"[\s(]*([A-Z]+)")
_ROW_LOCK = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+UPDATE|UPDATE|KEY\s+SHARE|SHARE)\b")
_CTE_WRITE = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b")
_COPY_FROM = re.compile(r"\bFROM\s+(?:STDIN|_|PROGRAM)")
# Calls of pg_advisory_lock, pg_advisory_xact_lock_shared, pg_try_advisory_lock...
# and of the unlock functions: a replica holds none of the app's locks.
_ADVISORY = re.compile(r"\bPG_(?:TRY_)?ADVISORY_\w*\s*\(")
# SET forms whose effect ends with the transaction: SET LOCAL, SET TRANSACTION,
# SET SESSION CHARACTERISTICS (sets defaults for later transactions, but is harmless
# on a replica: it cannot make one read-write) and SET CONSTRAINTS.
_SET_SCOPED = re.compile(
    r"SET\s+(?:LOCAL\b|TRANSACTION\b|SESSION\s+CHARACTERISTICS\b|CONSTRAINTS\b)"
)
# PRAGMA [schema.]name, then "=" or "(": assignments, except the pragmas whose
# argument names what to read, and wal_checkpoint's (how to checkpoint: it moves
# pages already written, and changes no content).
_PRAGMA = re.compile(r"PRAGMA\s+(?:\w+\s*\.\s*)?(\w+)\s*([=(]?)")
_PRAGMA_READS_WITH_ARGUMENT = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
        "wal_checkpoint",
    }
)

# Statements up to this many characters are cached; longer ones are classified each
# time. What the ORM and Core send is a few hundred characters; the long ones are
# mostly "IN (...)" lists made per request, which a cache only fills. The cache
# then holds at most _CACHE_SIZE * _CACHED_CHARS characters (about 4 MiB).
_CACHED_CHARS = 2048
_CACHE_SIZE = 2048

_SEVERITY = {
    StatementKind.READ: 0,
    StatementKind.SESSION: 1,
    StatementKind.LOCK: 2,
    StatementKind.WRITE: 3,
}


def skeleton(sql: str, *, postgresql: bool = True) -> str:
    """``sql`` with its literals and quoted identifiers replaced by ``_`` and its
    comments by a space: the words left are keywords and plain names."""
    start = _PG_START if postgresql else _SQLITE_START
    found = start.search(sql)
    if found is None:
        return sql  # most statements the ORM sends: nothing to blank out
    parts: list[str] = []
    pos = 0
    while found is not None:
        at = found.start()
        token = _token_at(sql, at, postgresql)
        if token is None:
            found = start.search(sql, at + 1)
            continue
        begin, end, blank = token
        parts.append(sql[pos:begin])
        parts.append(blank)
        pos = end
        found = start.search(sql, pos)
    parts.append(sql[pos:])
    return "".join(parts)


def _token_at(sql: str, at: int, postgresql: bool) -> tuple[int, int, str] | None:
    """The token starting at ``at``: its start, its end and what replaces it."""
    char = sql[at]
    if char == "'":
        if (
            postgresql
            and at
            and sql[at - 1] in "Ee"
            and (at == 1 or sql[at - 2] not in _IDENTIFIER_CHARS)
        ):
            return at - 1, _match_end(_ESCAPE_STRING, sql, at), " _ "
        return at, _match_end(_STANDARD_STRING, sql, at), " _ "
    if char == '"':
        return at, _match_end(_IDENTIFIER, sql, at), " _ "
    if char == "-":
        if not sql.startswith("--", at):
            return None
        end = sql.find("\n", at)
        return at, len(sql) if end < 0 else end, " "
    if char == "/":
        if not sql.startswith("/*", at):
            return None
        if postgresql:
            return at, _end_of_nested_comment(sql, at + 2), " "
        end = sql.find("*/", at + 2)
        return at, len(sql) if end < 0 else end + 2, " "
    if char == "$":
        # A dollar quote, unless "$" continues a name or is a "$1" parameter.
        if at and sql[at - 1] in _IDENTIFIER_CHARS:
            return None
        tag = _DOLLAR_TAG.match(sql, at)
        if tag is None:
            return None
        end = sql.find(tag.group(), tag.end())
        return at, len(sql) if end < 0 else end + len(tag.group()), " _ "
    if char == "`":
        return at, _match_end(_BACKTICK_IDENTIFIER, sql, at), " _ "
    # "[" in SQLite: a bracketed identifier.
    end = sql.find("]", at + 1)
    return at, len(sql) if end < 0 else end + 1, " _ "


def _match_end(pattern: re.Pattern[str], sql: str, at: int) -> int:
    match = pattern.match(sql, at)
    return match.end() if match is not None else len(sql)


def _end_of_nested_comment(sql: str, pos: int) -> int:
    # PostgreSQL's block comments nest: "/* a /* b */ c */" is one comment.
    depth = 1
    for edge in _PG_COMMENT_EDGE.finditer(sql, pos):
        depth += 1 if edge.group() == "/*" else -1
        if depth == 0:
            return edge.end()
    return len(sql)


def _kind_of(statement: str) -> StatementKind:
    match = _FIRST_WORD.match(statement)
    if match is None:
        return StatementKind.READ
    verb = match.group(1)
    if verb in _WRITE_VERBS:
        return StatementKind.WRITE
    if verb == "SELECT" or verb == "TABLE" or verb == "VALUES" or verb == "WITH":
        # The "in" tests first: a plain substring search is many times faster than
        # a regex over a long "IN (...)" statement, which is not cached.
        if "FOR" in statement and _ROW_LOCK.search(statement) is not None:
            return StatementKind.WRITE
        if verb == "WITH" and _CTE_WRITE.search(statement) is not None:
            return StatementKind.WRITE
        if "ADVISORY" in statement and _ADVISORY.search(statement) is not None:
            return StatementKind.LOCK
        return StatementKind.READ
    if verb == "SET":
        if _SET_SCOPED.match(statement, match.start(1)) is not None:
            return StatementKind.READ
        return StatementKind.SESSION
    if verb in _SESSION_VERBS:
        return StatementKind.SESSION
    if verb == "COPY":
        return StatementKind.WRITE if _COPY_FROM.search(statement) else StatementKind.READ
    if verb == "PRAGMA":
        pragma = _PRAGMA.match(statement, match.start(1))
        if (
            pragma is not None
            and pragma.group(2)
            and (
                pragma.group(2) == "=" or pragma.group(1).lower() not in _PRAGMA_READS_WITH_ARGUMENT
            )
        ):
            return StatementKind.WRITE
    return StatementKind.READ


def _classify(sql: str, postgresql: bool) -> StatementKind:
    bare = skeleton(sql, postgresql=postgresql).upper()
    if ";" not in bare:
        return _kind_of(bare)
    # Several statements in one string (psycopg sends them in one simple query):
    # the most consequential decides.
    return max((_kind_of(part) for part in bare.split(";")), key=_SEVERITY.__getitem__)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _classify_pg_cached(sql: str) -> StatementKind:
    return _classify(sql, True)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _classify_sqlite_cached(sql: str) -> StatementKind:
    return _classify(sql, False)


def classify_sql(sql: str, *, postgresql: bool = True) -> StatementKind:
    """What ``sql`` does: read, write, advisory lock or session change.

    Lexes like PostgreSQL (E'' strings, dollar quotes, nested comments) or, with
    ``postgresql=False``, like SQLite (backtick and bracket identifiers). Errs
    towards "write" for a ``WITH`` query that names a data-modifying verb outside
    literals. Statements of up to 2,048 characters are cached (the compiled cache
    hands the same strings over and over); longer ones are not kept.
    """
    if len(sql) > _CACHED_CHARS:
        return _classify(sql, postgresql)
    if postgresql:
        return _classify_pg_cached(sql)
    return _classify_sqlite_cached(sql)


def is_write_sql(sql: str, *, postgresql: bool = True) -> bool:
    """Whether ``sql`` changes data or schema, or takes row locks.

    Covers what the ORM flushes, Core DML, ``text()`` DML and DDL, ``SELECT ... FOR
    UPDATE``/``FOR SHARE``, data-modifying ``WITH`` queries and SQLite ``PRAGMA``
    assignments. Advisory locks and ``SET`` are not writes (see ``classify_sql``).
    """
    return classify_sql(sql, postgresql=postgresql) is StatementKind.WRITE
