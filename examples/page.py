"""The demo's one HTML page, shared by the Flask and Quart flavours."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from replicated_core.status import address_of

if TYPE_CHECKING:
    from replicated_core.router import Router

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>replicated-router demo</title>
<style>body{{font-family:sans-serif;max-width:40em;margin:2em auto}}
.node{{padding:.5em;border-radius:4px;background:{colour}}}</style></head>
<body>
<h1>Items</h1>
<p class="node" id="served-by">Served by <b id="node">{node}</b>
(<span id="server">{server}</span>) because <i id="reason">{reason}</i>.</p>
<ul id="items">{items}</ul>
<form method="post" action="{action}">
<input name="name" id="name" placeholder="New item" required>
<button type="submit" id="add">Add</button></form>
<p><small>{note}</small></p>
</body></html>"""


def render(
    node: str, role: str, server: str, reason: str, names: list[str], action: str, note: str
) -> str:
    """The list page, saying which node served it and why."""
    return PAGE.format(
        colour="#fde2c8" if role == "primary" else "#d4f0d4",
        node=escape(f"{node} ({role})"),
        server=escape(server),
        reason=escape(reason),
        items="".join(f"<li>{escape(name)}</li>" for name in names),
        action=escape(action),
        note=escape(note),
    )


def render_page(router: Router, names: list[str], note: str) -> str:
    """The list page for the current request, saying which node served it and why."""
    node = router.node()
    decision = router.requests.current_decision()
    reason = decision.reason.value if decision is not None else "outside a request"
    # As the status command shows it: no user name, no password, no driver.
    server = address_of(node)
    return render(node.name, node.role.value, server, reason, names, "/items", note)
