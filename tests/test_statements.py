import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from replicated_core.statements import is_write_sql

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


def test_a_for_update_comment_errs_towards_write():
    """A row-lock clause anywhere in a SELECT counts: a false write is a clear error, a
    false read would be a lock taken on a replica."""
    assert is_write_sql("SELECT 1 /* FOR UPDATE */") is True


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
