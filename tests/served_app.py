"""An app served by separate uvicorn processes in tests (settings from MW_* variables)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meterwall import Meterwall


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def hello(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


async def writer(request: Request) -> JSONResponse:
    """This process's journal writer id: a test that kills workers reads their journals."""
    return JSONResponse({"writer": app.flusher.writer})


routes = [Route("/echo/{n:int}", echo, methods=["POST"]), Route("/writer", writer)]
routes += [Route(f"/{name}", hello) for name in ("a", "b", "c", "d")]
app = Meterwall(Starlette(routes=routes))
