"""A kernel manager for papermill whose client never waits forever on a missed wake-up.

Executing a notebook, nbclient waits for the kernel's ``execute_reply`` with
``shell_channel.get_msg(timeout=None)``, i.e. one ZeroMQ poll without a time limit. Now and
then (here: about one run in three of a notebook whose cell shows an ipywidgets explorer)
the reply arrives but the poll is never woken: the kernel sits idle, the reply sits in the
socket's queue, and papermill hangs for ever (jupyter/nbclient#312 describes the same
symptom). A fresh poll finds such a message at once, so the channels below replace the
unlimited wait by polls of one second in a loop; their behaviour is otherwise unchanged.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.channels import AsyncZMQSocketChannel
from jupyter_client.manager import AsyncKernelManager
from traitlets import DottedObjectName, Type

#: Seconds of one poll while waiting without a time limit.
POLL_INTERVAL_S = 1.0


class RepollingChannel(AsyncZMQSocketChannel):
    """``get_msg(timeout=None)`` polls again every :data:`POLL_INTERVAL_S` instead of once for ever."""

    async def get_msg(self, timeout: float | None = None) -> dict[str, Any]:  # type: ignore[override]
        if timeout is not None:
            return await super().get_msg(timeout)
        while True:
            try:
                return await super().get_msg(POLL_INTERVAL_S)
            except Empty:
                continue


class RepollingKernelClient(AsyncKernelClient):
    """An async kernel client whose shell and IOPub channels are :class:`RepollingChannel`."""

    shell_channel_class = Type(RepollingChannel)  # type: ignore[assignment]
    iopub_channel_class = Type(RepollingChannel)  # type: ignore[assignment]


class RepollingKernelManager(AsyncKernelManager):
    """Give as ``kernel_manager_class`` to ``papermill.execute_notebook`` (nbclient)."""

    client_class = DottedObjectName("cxrlib._kernel_client.RepollingKernelClient")
    client_factory = Type(RepollingKernelClient, klass=AsyncKernelClient)  # type: ignore[assignment]
