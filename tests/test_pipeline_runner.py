"""Running notebooks: the kernel client never waits for ever on one poll; CLI notebook parameters."""

from __future__ import annotations

import asyncio
from queue import Empty

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from cxrlib import _kernel_client, pipeline
from cxrlib.__main__ import main
from cxrlib._kernel_client import RepollingChannel, RepollingKernelClient, RepollingKernelManager


def test_manager_hands_out_repolling_channels():
    client = RepollingKernelManager(kernel_name="python3").client()
    assert isinstance(client, RepollingKernelClient)
    assert isinstance(client.shell_channel, RepollingChannel)
    assert isinstance(client.iopub_channel, RepollingChannel)


def test_unlimited_wait_polls_again_until_a_message_arrives(monkeypatch):
    monkeypatch.setattr(_kernel_client, "POLL_INTERVAL_S", 0.02)

    async def scenario() -> tuple[dict, int]:
        context = zmq.asyncio.Context()
        receiver, sender = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
        receiver.bind("inproc://repoll-test")
        sender.connect("inproc://repoll-test")
        session = Session(key=b"")
        channel = RepollingChannel(receiver, session)
        polls = 0
        original = receiver.poll

        def counting_poll(*args, **kwargs):
            nonlocal polls
            polls += 1
            return original(*args, **kwargs)

        receiver.poll = counting_poll

        async def send_later() -> None:
            await asyncio.sleep(0.2)
            session.send(sender, "status", {"execution_state": "idle"})

        task = asyncio.ensure_future(send_later())
        message = await asyncio.wait_for(channel.get_msg(), timeout=5)
        await task
        with pytest.raises(Empty):  # a given timeout still raises as before
            await channel.get_msg(timeout=0.01)
        for socket in (receiver, sender):
            socket.close(linger=0)
        context.term()
        return message, polls

    message, polls = asyncio.run(scenario())
    assert message["header"]["msg_type"] == "status"
    assert polls > 2  # it timed out and polled again before the message came


def test_cli_passes_notebook_parameters(monkeypatch, tmp_path):
    seen = {}

    def fake_run_pipeline(**kwargs):
        seen.update(kwargs)
        return pipeline.PipelineResult(run_dir=tmp_path)

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    monkeypatch.setattr(pipeline, "print_outputs", lambda result: None)
    code = main(["pipeline", "--profile", "real-cpu", "--notebooks", "02", "--run-dir", str(tmp_path),
                 "--param", "SEG_DATA=data/Radiography DB", "--param", "N_TEST_PATIENTS=50"])
    assert code == 0
    assert seen["extra_params"] == {"SEG_DATA": "data/Radiography DB", "N_TEST_PATIENTS": 50}
    with pytest.raises(SystemExit):
        main(["pipeline", "--param", "no-equals-sign"])
