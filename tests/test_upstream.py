"""The request path's lean HTTP client (model_supervisor.http.upstream) against fake upstreams: aiohttp servers on
loopback standing in for a model's server where a real one cannot show the behaviour on cue (a flood of bytes, a
server that drops idle connections, a peer that accepts and closes). No llama-server needed."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import web
from fake_children import fake_upstream

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024


def chat_body(stream: bool = False) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def one_model(start_fake_daemon, tmp_path, url: str):
    model = tmp_path / "a.gguf"
    model.write_bytes(b"x")
    d = await start_fake_daemon({"a": {"model": str(model), "vram_mb": 1}})
    d.daemon.children.upstreams["a"] = url
    return d


async def until(predicate, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_slow_client_pauses_reading_from_the_model_and_gets_every_byte(start_fake_daemon, tmp_path):
    written = [0]
    block = bytes(range(256)) * 256  # 64 KiB, a pattern the client checks

    async def flood(request):
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(64 * MB // len(block)):
            await response.write(block)  # blocks while the daemon does not read
            written[0] += len(block)
        await response.write_eof()
        return response

    async with fake_upstream(flood) as url:
        d = await one_model(start_fake_daemon, tmp_path, url)
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{d.url}/v1/chat/completions", json=chat_body(stream=True)) as response:
                assert response.status == 200
                await response.content.readexactly(len(block))
                # The client reads nothing more: the model's writes must stall with a few MB in flight (socket
                # buffers), not 64 MB held by the daemon.
                last = -1
                while written[0] != last:
                    last = written[0]
                    await asyncio.sleep(0.2)
                assert written[0] < 24 * MB, f"the daemon read {written[0] / MB:.0f} MB ahead of its client"
                received = len(block)
                while chunk := await response.content.read(MB):
                    assert chunk == (block * (len(chunk) // len(block) + 2))[received % len(block):][:len(chunk)]
                    received += len(chunk)
    assert received == written[0] == 64 * MB


async def test_sequential_requests_share_one_kept_alive_connection(start_fake_daemon, tmp_path):
    peers = []

    async def answer(request):
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"ok": len(peers)})

    async with fake_upstream(answer) as url:
        d = await one_model(start_fake_daemon, tmp_path, url)
        for n in range(1, 6):
            status, body, headers = await d.chat("a")
            assert (status, body, headers["X-Served-By"]) == (200, {"ok": n}, "local")
    assert len(set(peers)) == 1


async def test_a_pooled_connection_the_server_dropped_is_replaced_and_the_request_sent_once(start_fake_daemon,
                                                                                            tmp_path):
    seen = []

    async def answer(request):
        seen.append(await request.json())
        response = web.json_response({"n": len(seen)})
        return response

    async with fake_upstream(answer) as url:
        d = await one_model(start_fake_daemon, tmp_path, url)
        assert (await d.chat("a"))[0] == 200
        # The server lets go of its idle connections (llama-server does after 5 s); the daemon's pooled one is dead.
        pool = d.daemon.proxy.pool
        idle = [answer for connections in pool._idle.values() for answer in connections]
        assert len(idle) == 1
        idle[0].transport.abort()
        status, body, _ = await d.chat("a")
        assert (status, body) == (200, {"n": 2})
    assert len(seen) == 2


async def test_a_server_that_reads_the_request_and_closes_gets_it_once_and_the_client_a_502(start_fake_daemon,
                                                                                            tmp_path):
    requests = []

    async def read_and_close(reader, writer):
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()

    server = await asyncio.start_server(read_and_close, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        d = await one_model(start_fake_daemon, tmp_path, url)
        status, body, _ = await d.chat("a")
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert len(requests) == 1  # may have reached a server: never sent twice


async def test_an_answer_cut_mid_body_after_reuse_ends_the_stream_with_an_error_event(start_fake_daemon, tmp_path):
    async def cut(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                if b"cut" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                                 b"\r\n\r\n10\r\ndata: {\"n\": 1}\n\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        d = await one_model(start_fake_daemon, tmp_path, url)
        assert (await d.chat("a"))[0] == 200
        async with d.http.post(f"{d.url}/v1/chat/completions", json=chat_body(stream=True),
                               headers={"X-Test": "cut"}) as response:
            assert response.status == 200
            text = (await response.read()).decode()
    assert text.startswith('data: {"n": 1}\n\n')
    assert '"code": "upstream_failed"' in text
    await until(lambda: d.runtime.core.models["a"].in_flight == 0)


async def test_a_kept_alive_connection_with_unasked_bytes_on_it_is_not_used_again(start_fake_daemon, tmp_path):
    requests, connections = [], []

    async def chatty(reader, writer):
        connections.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                requests.append(head)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstale!")  # an answer nobody asked for
                await writer.drain()

    server = await asyncio.start_server(chatty, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        d = await one_model(start_fake_daemon, tmp_path, url)
        for _ in range(3):
            status, body, _ = await d.chat("a")
            assert (status, body) == (200, {})
    assert len(requests) == 3  # each sent once
    assert len(connections) == 3  # none went out on a connection that carried the stale answer


async def raw_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def read_request(reader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return head, await reader.readexactly(length)


async def test_interim_answers_are_skipped_and_each_client_gets_its_own_answer(start_fake_daemon, tmp_path):
    heads = []

    async def with_interim(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head, body = await read_request(reader)
                heads.append(head)
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
                await writer.drain()
                answer = b'{"echo": %s}' % body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
                await writer.drain()

    server, url = await raw_server(with_interim)
    async with server:
        d = await one_model(start_fake_daemon, tmp_path, url)
        for n in range(3):
            body = {"model": "a", "messages": [{"role": "user", "content": f"client {n}"}]}
            async with d.http.post(f"{d.url}/v1/chat/completions", json=body,
                                   headers={"Expect": "100-continue"}) as response:
                assert response.status == 200
                assert (await response.json())["echo"] == body  # its own answer, not the one before
                assert "Link" not in response.headers  # the interim answer's header is not the answer's
    assert len(heads) == 3 and not any(b"expect:" in head.lower() for head in heads)


async def test_a_path_and_query_that_need_encoding_reach_the_model_as_sent(start_fake_daemon, tmp_path):
    seen = []

    async def record(request):
        seen.append((request.method, request.path, dict(request.query)))
        return web.json_response({})

    async with fake_upstream(record) as url:
        d = await one_model(start_fake_daemon, tmp_path, url)
        async with d.http.post(f"{d.url}/upstream/a/up%20load/b%C3%A9?name=my%20file.png&x=%26") as response:
            assert response.status == 200
    assert seen == [("POST", "/up load/bé", {"name": "my file.png", "x": "&"})]


async def test_an_answer_that_ends_when_the_connection_closes_is_whole_not_cut(start_fake_daemon, tmp_path, caplog):
    async def http10(reader, writer):
        await read_request(reader)
        writer.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"whole": true}')
        await writer.drain()
        writer.close()

    server, url = await raw_server(http10)
    async with server:
        d = await one_model(start_fake_daemon, tmp_path, url)
        status, body, _ = await d.chat("a")
    assert (status, body) == (200, {"whole": True})
    assert "upstream_cut" not in caplog.text
