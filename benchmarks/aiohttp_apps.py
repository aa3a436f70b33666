"""The aiohttp servers of ``python -m benchmarks.aiohttp_bench``, one process each.

``python -m benchmarks.aiohttp_apps --variant bare|meterwall --port N [--profile OUT]`` serves the
same trivial app as the ASGI benchmark (benchmarks/apps.py) with ``aiohttp.web.run_app``, access
log off: ``GET /ping`` returns a small JSON, ``POST /echo`` parses the JSON body and returns a
small JSON (the same bytes as Starlette's ``JSONResponse``). ``meterwall`` mounts
``meterwall_aiohttp.setup(app, Settings.from_env())``, configured by the ``MW_*`` variables.
SIGTERM stops it cleanly: aiohttp runs its cleanup hooks, meterwall's final flush among them.
``--profile OUT`` runs the whole server under cProfile and dumps the stats to OUT on exit.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import logging

from aiohttp import web

_dumps = functools.partial(json.dumps, ensure_ascii=False, separators=(",", ":"))


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"pong": True}, dumps=_dumps)


async def echo(request: web.Request) -> web.Response:
    data = await request.json()
    return web.json_response({"ok": True, "fields": len(data)}, dumps=_dumps)


def make_app(variant: str) -> web.Application:
    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_post("/echo", echo)
    if variant == "meterwall":
        import meterwall_aiohttp

        from meterwall import Settings

        meterwall_aiohttp.setup(app, Settings.from_env())
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--variant", choices=["bare", "meterwall"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--profile", metavar="OUT", help="cProfile the server, stats to OUT")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = make_app(args.variant)  # imports and set-up stay out of the profile
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        web.run_app(app, host=args.host, port=args.port, access_log=None,
                    print=None)  # fmt: skip
    finally:  # run_app returns after the cleanup hooks: the final flush is in the profile
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
