#!/usr/bin/python3
"""An independent client of gatekey's console endpoint (v5.channel.k8s.io),
written against the protocol, not gatekey's code: Python's `websockets`.

usage: console_client.py URL CA_CERT API_KEY AGENT

Runs four checks and prints one line per check; exits non-zero on the first
failure.
"""
import asyncio
import json
import ssl
import sys
import urllib.parse

import websockets

STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def url_for(base, agent, metadata):
    q = urllib.parse.urlencode({"metadata": json.dumps(metadata)})
    return f"{base.replace('https://', 'wss://')}/ws/v1/devices/{agent}/console?{q}"


async def session(base, ctx, key, agent, metadata, script):
    """Connects, runs `script(ws, out)`, and returns (output, status)."""
    out = bytearray()
    status = None
    async with websockets.connect(
        url_for(base, agent, metadata),
        ssl=ctx,
        subprotocols=["v5.channel.k8s.io"],
        extra_headers={"Authorization": f"Bearer {key}"},
        max_size=2**21,
    ) as ws:
        assert ws.subprotocol == "v5.channel.k8s.io", ws.subprotocol

        async def reader():
            nonlocal status
            async for msg in ws:
                if msg[0] in (STDOUT, STDERR):
                    out.extend(msg[1:])
                elif msg[0] == STATUS:
                    status = json.loads(msg[1:])

        task = asyncio.create_task(reader())
        await script(ws, out)
        await asyncio.wait_for(task, 20)
    return bytes(out), status


async def wait_for(out, needle, timeout=15):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while needle not in out:
        if loop.time() > end:
            raise AssertionError(f"{needle!r} not seen in {bytes(out)!r}")
        await asyncio.sleep(0.02)


async def main(base, ca, key, agent):
    ctx = ssl.create_default_context(cafile=ca)

    # tty: echo, resize, exit status on channel 3.
    async def tty_script(ws, out):
        await ws.send(bytes([STDIN]) + b"echo py-$((6*7))\r")
        await wait_for(out, b"py-42")
        await ws.send(bytes([RESIZE]) + json.dumps({"Width": 132, "Height": 43}).encode())
        await ws.send(bytes([STDIN]) + b"stty size\r")
        await wait_for(out, b"43 132")
        await ws.send(bytes([STDIN]) + b"exit 3\r")

    out, status = await session(
        base, ctx, key, agent,
        {"tty": True, "initialDimensions": {"Width": 80, "Height": 24}}, tty_script)
    assert status and status["status"] == "Failure", status
    assert status["reason"] == "NonZeroExitCode", status
    codes = [c["message"] for c in status["details"]["causes"] if c["reason"] == "ExitCode"]
    assert codes == ["3"], status
    print("ok tty echo, resize and exit status")

    # non-tty command: stdin, half-close on channel 255, stdout/stderr apart.
    async def pipe_script(ws, out):
        await ws.send(bytes([STDIN]) + b"hello\nworld\n")
        await ws.send(bytes([CLOSE, STDIN]))

    out, status = await session(
        base, ctx, key, agent,
        {"tty": False, "command": {"command": "sort", "args": ["-r"]}}, pipe_script)
    assert out == b"world\nhello\n", out
    assert status and status["status"] == "Success", status
    print("ok non-tty stdin, half-close and status")

    # A refusal before the upgrade carries an HTTP status.
    try:
        await session(base, ctx, key, "no-such-agent", {"tty": True}, pipe_script)
        raise AssertionError("unknown agent was accepted")
    except websockets.exceptions.InvalidStatusCode as e:
        assert e.status_code == 404, e.status_code
    print("ok unknown agent refused with 404")

    # A wrong key is refused with 401.
    try:
        await session(base, ctx, "gk_wrong", agent, {"tty": True}, pipe_script)
        raise AssertionError("wrong key was accepted")
    except websockets.exceptions.InvalidStatusCode as e:
        assert e.status_code == 401, e.status_code
    print("ok wrong key refused with 401")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
