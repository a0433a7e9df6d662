"""A Flask app and its Celery tasks, for tests/test_jobs.py: gunicorn serves ``jobs_app:app``
and a real ``celery worker`` runs ``jobs_app:celery``, both from this module.

``POST /orders`` writes an order and enqueues a job that reads it back: the form's ``job``
says which read (``after``: under ``use_replica(after=token)`` with the request's
consistency token; ``plain``: under ``use_replica()``; ``primary``: under
``use_primary()``). The job answers what it read (None when the row was not there: a
stale read), which server answered (asked of the connection that read), and whether the
delayed replica had the row once the read was done (if not, a read there would have been
stale). ``GET /jobs/<id>`` answers a job's state and result, so that the test process
needs no Celery of its own.

Broker and results are files (kombu's filesystem transport, made atomic below; Celery's
file backend) in
folders the test names: no broker server. Settings come from the environment as for the
other server apps (tests/server_apps/server_settings.py), plus ``jobs``: the folders and
the worker's ready file.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_ready
from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils import json as kombu_json
from server_settings import WHO_SQL, load

from flask_replicated import FlaskReplicated, use_primary, use_replica

settings = load()
urls = settings["urls"]
jobs = settings["jobs"]

app = Flask(__name__)
app.config.update(
    SECRET_KEY=settings["secret_key"],
    SQLALCHEMY_DATABASE_URI=urls["primary"],
    SQLALCHEMY_BINDS={"master": urls["primary"], **{r: urls[r] for r in settings["replicas"]}},
    REPLICATED_REPLICA_BINDS=settings["replicas"],
    **settings["config"],
)
db = SQLAlchemy(app)
rep = FlaskReplicated(app)


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "job_orders"
    id = sa.Column(sa.Integer, primary_key=True)
    value = sa.Column(sa.String(64), nullable=False)


class _AtomicChannel(filesystem.Channel):  # type: ignore[misc]
    """kombu's filesystem channel, but a message appears in the queue folder whole.

    kombu creates the file in the folder and then writes it, and a consumer polling
    meanwhile may move and read it empty: the worker's main process then dies of a
    JSONDecodeError (kombu issue 1551). Here the file is written beside the folder
    and renamed into it, which is atomic on one filesystem.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staged = STAGING / name
        staged.write_bytes(kombu_json.dumps(payload).encode())
        os.replace(staged, Path(self.data_folder_out) / name)


class AtomicFilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    Channel = _AtomicChannel


STAGING = Path(jobs["queue"]).parent / "staging"
STAGING.mkdir(exist_ok=True)
TRANSPORT_ALIASES["atomicfs"] = "jobs_app:AtomicFilesystemTransport"

celery = Celery("jobs_app", broker="atomicfs://", backend=f"file://{jobs['results']}")
celery.conf.update(
    broker_transport_options={
        "data_folder_in": jobs["queue"],
        "data_folder_out": jobs["queue"],
        "processed_folder": jobs["processed"],
        # Else kombu makes a "control" folder in the working directory (the repository).
        "control_folder": jobs["control"],
        # The transport polls its folder: once a second by default, by when the delayed
        # replica has caught up and a stale read could no longer show.
        "polling_interval": 0.02,
    },
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
)

# A plain engine on the delayed replica, outside the router: what a read there sees.
delayed = sa.create_engine(urls[settings["delayed"]], pool_size=2)


@worker_ready.connect
def _say_ready(**_: Any) -> None:
    """The worker consumes from the queue: tell the test, which waits for this file."""
    Path(jobs["ready_file"]).write_text(str(os.getpid()))


def _read(order_id: int) -> dict[str, Any]:
    value = db.session.scalar(sa.select(Order.value).where(Order.id == order_id))
    port, in_recovery = db.session.execute(sa.text(WHO_SQL)).one()
    with delayed.connect() as conn:
        delayed_had_row = (
            conn.execute(
                sa.text("SELECT 1 FROM job_orders WHERE id = :id"), {"id": order_id}
            ).scalar()
            is not None
        )
    return {
        "order_id": order_id,
        "value": value,
        "port": port,
        "in_recovery": in_recovery,
        "delayed_had_row": delayed_had_row,
        "pid": os.getpid(),
    }


@celery.task
def read_after(order_id: int, token: str) -> dict[str, Any]:
    """Read the order on a replica that has replayed the request's commit, else the primary."""
    with app.app_context(), use_replica(after=token):
        return _read(order_id)


@celery.task
def read_plain(order_id: int) -> dict[str, Any]:
    """Read the order on a replica, with no token: it may not be there yet."""
    with app.app_context(), use_replica():
        return _read(order_id)


@celery.task
def read_primary(order_id: int) -> dict[str, Any]:
    """Read the order on the primary."""
    with app.app_context(), use_primary():
        return _read(order_id)


@app.get("/health")
def health() -> Any:
    return {"pid": os.getpid()}


@app.post("/orders")
def create_order() -> Any:
    order = Order(value=request.form["value"])
    db.session.add(order)
    db.session.flush()
    order_id = order.id
    db.session.commit()
    job = request.form["job"]
    if job == "after":
        task = read_after.delay(order_id, token=rep.consistency_token())
    elif job == "plain":
        task = read_plain.delay(order_id)
    elif job == "primary":
        task = read_primary.delay(order_id)
    else:
        return {"error": f"Unknown job {job!r}: 'after', 'plain' or 'primary'."}, 400
    return {"order_id": order_id, "task_id": task.id}, 201


@app.get("/jobs/<task_id>")
def job_state(task_id: str) -> Any:
    result = celery.AsyncResult(task_id)
    if not result.ready():
        return {"state": result.state}
    if result.successful():
        return {"state": result.state, "result": result.result}
    return {"state": result.state, "error": repr(result.result), "traceback": result.traceback}
