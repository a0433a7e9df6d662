"""The statement classifier: tables of statements, a property test of literals and
comments, and the memory its cache keeps."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from replicated_core import statements as statements_module
from replicated_core.statements import StatementKind, classify_sql, is_write_sql

WRITES = [
    "INSERT INTO items (name) VALUES ('a')",
    "  insert into items values (1)",
    "UPDATE items SET name = 'b'",
    "DELETE FROM items",
    "MERGE INTO items USING other ON true WHEN MATCHED THEN DELETE",
    "CREATE TABLE t (id int)",
    "ALTER TABLE items ADD COLUMN x int",
    "DROP TABLE items",
    "TRUNCATE items",
    "GRANT SELECT ON items TO bob",
    "SELECT * FROM items FOR UPDATE",
    "SELECT * FROM items WHERE id = 1 FOR NO KEY UPDATE",
    "select * from items for share",
    "SELECT * FROM items FOR KEY SHARE SKIP LOCKED",
    "WITH moved AS (DELETE FROM items RETURNING *) SELECT * FROM moved",
    "-- a comment\nINSERT INTO items VALUES (1)",
    "/* multi\nline */ UPDATE items SET name = 'x'",
    "(SELECT id FROM items FOR UPDATE)",
    "COPY items FROM STDIN",
    "VACUUM items",
    "LOCK TABLE items",
    "REFRESH MATERIALIZED VIEW mv",
    "CALL do_things()",
]
READS = [
    "SELECT 1",
    "select name from items where name = 'update me'",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SHOW server_version",
    "EXPLAIN SELECT 1",
    "COPY items TO STDOUT",
    "BEGIN",
    "COMMIT",
    "SAVEPOINT sa_savepoint_1",
    "PRAGMA table_info(items)",
    "",
    "   ",
]


@pytest.mark.parametrize("sql", WRITES)
def test_writes_are_recognised(sql):
    assert is_write_sql(sql) is True


@pytest.mark.parametrize("sql", READS)
def test_reads_are_recognised(sql):
    assert is_write_sql(sql) is False


@pytest.mark.parametrize("dialect", [postgresql.dialect(), sqlite.dialect()])
def test_compiled_core_statements(dialect):
    items = sa.table("items", sa.column("id"), sa.column("name"))
    compiled = {
        "insert": sa.insert(items).values(name="a"),
        "update": sa.update(items).values(name="b"),
        "delete": sa.delete(items),
        "select": sa.select(items),
    }
    kinds = {k: is_write_sql(str(v.compile(dialect=dialect))) for k, v in compiled.items()}
    assert kinds == {"insert": True, "update": True, "delete": True, "select": False}


def test_select_for_update_compiled_for_postgresql():
    items = sa.table("items", sa.column("id"))
    stmt = sa.select(items).with_for_update()
    assert is_write_sql(str(stmt.compile(dialect=postgresql.dialect()))) is True


# Literals and comments do not decide; each of these is a read on both backends
# unless marked.
LITERAL_READS = [
    "SELECT * FROM items WHERE name = 'ready for update'",
    "WITH words AS (SELECT 'insert' AS word) SELECT word FROM words",
    "WITH x AS (SELECT 1) SELECT * FROM x WHERE 'delete' <> 'merge'",
    "SELECT * FROM items /* for share */",
    "SELECT 1 -- FOR UPDATE",
    "SELECT id FROM items /*controller='items',framework='flask%3A3.1',route='/items/update'*/",
    "WITH x AS (SELECT 1) SELECT * FROM x /*action='delete',route='/update'*/",
    'SELECT "for update", "insert" FROM items',
    "SELECT 'it''s for update'",
    "SELECT pg_advisory_lock_count FROM stats WHERE note = 'pg_advisory_lock(1)'",
    "SELECT 1 WHERE 'SET x = 1' = ''",
]
PG_LITERAL_READS = [
    "SELECT E'it\\'s FOR UPDATE'",
    "SELECT $$ FOR UPDATE $$",
    "SELECT $fn$ DELETE FROM items; $$ nested $$ $fn$",
    "SELECT 1 /* outer /* inner */ still a comment: FOR UPDATE */",
    "SELECT $1::text, $2 FROM items",
    "SELECT U&\"d\\0061t\\+000061\" FROM items WHERE x = 'for update'",
]
SQLITE_LITERAL_READS = [
    "SELECT `for update` FROM items",
    "SELECT [for update] FROM items",
    "SELECT 1 /* for update */",
]
# (statement, kind on PostgreSQL and on SQLite)
KINDS = [
    ("SELECT pg_advisory_lock(42)", StatementKind.LOCK),
    ("SELECT pg_advisory_xact_lock(42)", StatementKind.LOCK),
    ("SELECT pg_try_advisory_lock(1, 2)", StatementKind.LOCK),
    ("SELECT pg_try_advisory_xact_lock_shared(7)", StatementKind.LOCK),
    ("select PG_ADVISORY_UNLOCK_ALL()", StatementKind.LOCK),
    ("SET search_path TO tenant_1", StatementKind.SESSION),
    ("SET SESSION statement_timeout = 0", StatementKind.SESSION),
    ("SET ROLE admin", StatementKind.SESSION),
    ("set time zone 'UTC'", StatementKind.SESSION),
    ("RESET ALL", StatementKind.SESSION),
    ("RESET search_path", StatementKind.SESSION),
    ("SET LOCAL statement_timeout = 1000", StatementKind.READ),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", StatementKind.READ),
    ("SET TRANSACTION READ WRITE", StatementKind.READ),  # the standby refuses it
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", StatementKind.READ),
    ("SET CONSTRAINTS ALL DEFERRED", StatementKind.READ),
    ("SELECT 1; SET search_path TO x", StatementKind.SESSION),
    ("SELECT 1; DELETE FROM items", StatementKind.WRITE),
    ("SELECT 'a;b'", StatementKind.READ),
    ("PRAGMA journal_mode = WAL", StatementKind.WRITE),
    ("PRAGMA main.user_version=7", StatementKind.WRITE),
    ("PRAGMA journal_mode(DELETE)", StatementKind.WRITE),
    ("PRAGMA journal_mode", StatementKind.READ),
    ("PRAGMA table_info(items)", StatementKind.READ),
    ('PRAGMA main.table_xinfo("items")', StatementKind.READ),
    ("PRAGMA main.index_list('items')", StatementKind.READ),
    ("PRAGMA wal_checkpoint(TRUNCATE)", StatementKind.READ),
    ("ATTACH DATABASE 'other.db' AS other", StatementKind.SESSION),
    ("DETACH DATABASE other", StatementKind.SESSION),
    ("COPY items FROM '/tmp/items.csv'", StatementKind.WRITE),
    ("COPY items TO STDOUT", StatementKind.READ),
]


@pytest.mark.parametrize("sql", LITERAL_READS + PG_LITERAL_READS)
def test_literals_and_comments_do_not_decide_on_postgresql(sql):
    assert classify_sql(sql) is StatementKind.READ


@pytest.mark.parametrize("sql", LITERAL_READS + SQLITE_LITERAL_READS)
def test_literals_and_comments_do_not_decide_on_sqlite(sql):
    assert classify_sql(sql, postgresql=False) is StatementKind.READ


def test_sqlite_comments_do_not_nest_and_have_no_escapes():
    """What PostgreSQL reads as a comment or a string, SQLite may not."""
    assert classify_sql("SELECT 1 /* a /* b */ FOR UPDATE */", postgresql=False) is (
        StatementKind.WRITE
    )
    assert classify_sql("SELECT 'a\\' FOR UPDATE --'", postgresql=False) is (StatementKind.WRITE)


@pytest.mark.parametrize(("sql", "kind"), KINDS)
def test_statement_kinds(sql, kind):
    assert classify_sql(sql) is kind
    assert classify_sql(sql, postgresql=False) is kind


def _standard(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _escaped(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dollar(text: str) -> str:
    tag = "$q$"
    while tag in text + "$":
        tag = tag[:-1] + "q$"
    return tag + text + tag


def _identifier(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _line_comment(text: str) -> str:
    return "-- " + text.replace("\n", " ").replace("\r", " ") + "\n"


def _nested_comment(text: str) -> str:
    bare = text.replace("*/", "* /").replace("/*", "/ *")
    return f"/* {bare} /* {bare} */ {bare} */"


def _flat_comment(text: str) -> str:
    return "/* " + text.replace("*/", "* /") + " */"


def _backtick(text: str) -> str:
    return "`" + text.replace("`", "``") + "`"


PG_WRAPPERS = [_standard, _escaped, _dollar, _identifier, _line_comment, _nested_comment]
SQLITE_WRAPPERS = [_standard, _identifier, _line_comment, _flat_comment, _backtick]
TEMPLATES = {
    "SELECT name FROM items WHERE name = {} ORDER BY id": StatementKind.READ,
    "WITH x AS (SELECT {} AS v) SELECT v FROM x": StatementKind.READ,
    "UPDATE items SET name = {} WHERE id = 1": StatementKind.WRITE,
    "SELECT id FROM items WHERE name = {} FOR UPDATE": StatementKind.WRITE,
    "SET LOCAL application_name = {}": StatementKind.READ,
}
# Text made of what could fool a classifier: keywords, quotes, comment marks.
PIECES = ["FOR UPDATE", "for share", "insert", "DELETE", ";", "SET x = 1", "'", "''", '"']
PIECES += ["\\", "$", "$$", "$q$", "--", "/*", "*/", "\n", " ", "é", "pg_advisory_lock(1)"]
NASTY = st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=12).map("".join)


@given(text=NASTY, wrapper=st.sampled_from(PG_WRAPPERS), template=st.sampled_from(list(TEMPLATES)))
def test_any_literal_or_comment_leaves_the_kind_alone_on_postgresql(text, wrapper, template):
    sql = template.format(wrapper(text))
    assert classify_sql(sql) is TEMPLATES[template], sql


@given(
    text=NASTY, wrapper=st.sampled_from(SQLITE_WRAPPERS), template=st.sampled_from(list(TEMPLATES))
)
def test_any_literal_or_comment_leaves_the_kind_alone_on_sqlite(text, wrapper, template):
    sql = template.format(wrapper(text))
    assert classify_sql(sql, postgresql=False) is TEMPLATES[template], sql


def _retained_by_classifying(make: Callable[[int], str], count: int) -> int:
    """Bytes still allocated after classifying ``count`` statements made by ``make``
    (made while tracing, so that what the cache keeps of them is counted)."""
    _clear_caches()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(count):
            classify_sql(make(number))
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        _clear_caches()


def _clear_caches() -> None:
    for name in ("_classify_pg_cached", "_classify_sqlite_cached"):
        getattr(statements_module, name).cache_clear()


_IDS = ", ".join(str(100_000 + k) for k in range(15_000))


def _large_in_query(number: int) -> str:
    # One allocation per statement: tracemalloc makes each allocation slow.
    return f"SELECT id, name FROM items WHERE id IN ({number}, {_IDS})"


def test_large_statements_are_not_kept_by_the_cache():
    """1,000 distinct large IN (...) queries of about 100 KB each (the old cache kept
    all of them, about 95 MiB): under 64 KiB stays allocated. Only statements of up
    to 2,048 characters are cached, so large ones leave nothing behind."""
    assert len(_large_in_query(0)) > 90_000
    retained = _retained_by_classifying(_large_in_query, 1_000)
    print(f"retained after 1,000 large statements: {retained / 1024:.1f} KiB")
    assert retained < 64 * 1024


def _statement_at_the_limit(number: int) -> str:
    return f"SELECT {number} FROM items WHERE name = '{'x' * 2048}'"[:2047] + "'"


def test_a_full_cache_stays_bounded():
    """The most the cache can hold: 2,048 statements of 2,048 characters, 4 MiB of
    text; with the strings' headers and the cache's own entries, under 5 MiB."""
    assert len(_statement_at_the_limit(0)) == 2048
    retained = _retained_by_classifying(_statement_at_the_limit, 3_000)
    print(f"retained by a full cache: {retained / 2**20:.2f} MiB")
    assert 4 * 2**20 < retained < 5 * 2**20
