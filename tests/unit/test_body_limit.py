"""Bodies over the limit get 413 before the route reads them, whether they declare their length
or arrive in chunks; smaller ones pass untouched."""

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from aiplatform.serving.app import BodyLimitMiddleware

read = []


def _client(limit: int = 100) -> TestClient:
    api = FastAPI()

    @api.post("/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        read.append(len(body))
        return {"bytes": len(body)}

    api.add_middleware(BodyLimitMiddleware, limit=limit)
    return TestClient(api)


def test_small_bodies_pass_and_large_ones_get_413_naming_the_limit():
    read.clear()
    client = _client()
    assert client.post("/echo", content=b"x" * 100).json() == {"bytes": 100}
    r = client.post("/echo", content=b"x" * 101)
    assert r.status_code == 413 and "over 100 bytes" in r.json()["detail"] and "aiplatform data import" in r.json()["detail"]
    assert read == [100]  # the route never saw the large one


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
    read.clear()
    client = _client()

    def chunks():
        for _ in range(10):
            yield b"y" * 30

    r = client.post("/echo", content=chunks())
    assert r.status_code == 413 and read == []
    assert client.post("/echo", content=iter([b"z" * 40, b"z" * 40])).json() == {"bytes": 80}
