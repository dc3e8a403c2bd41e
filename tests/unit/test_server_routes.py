"""smrd.replica.driver.Server's reply routes (client id -> the gateway that sent it) stay bounded: every
Idempotency-Key is a client id of its own, and a route outlives nothing the session table forgot.

The method under test runs on a stand-in holding only what it reads (the route table and a real
session table), since a whole Server needs sockets, an app and a data directory."""
from types import SimpleNamespace

from smrd.protocol.sessions import Sessions
from smrd.replica.driver import ROUTES_MIN, Server


def test_routes_of_sessions_the_table_forgot_are_pruned_and_the_limit_follows_the_table():
    sessions = Sessions(k=4, ttl_ms=1000)
    for cid in range(10):
        sessions.cache.put(cid, 1, b"OK", timestamp=0)
    routes = {cid: (b"gw", 1) for cid in range(10 * ROUTES_MIN)}
    server = SimpleNamespace(executor=SimpleNamespace(sessions=sessions), routes=routes,
                             _routes_limit=ROUTES_MIN)
    Server._prune_routes(server)
    assert server.routes == {cid: (b"gw", 1) for cid in range(10)}
    assert server._routes_limit == ROUTES_MIN

    # Sessions alive beyond the minimum keep their routes, and the next prune waits for twice
    # as many.
    for cid in range(10, 3 * ROUTES_MIN):
        sessions.cache.put(cid, 1, b"OK", timestamp=0)
        server.routes[cid] = (b"gw", 1)
    Server._prune_routes(server)
    assert len(server.routes) == 3 * ROUTES_MIN
    assert server._routes_limit == 6 * ROUTES_MIN
