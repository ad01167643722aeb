"""TensorBoard scalars written with the ``tensorboard`` package alone, without TensorFlow.

``tf.summary`` would import TensorFlow under any Keras backend; the event file
format is a sequence of records holding ``Event`` protocol buffers, which the
``tensorboard`` package can write by itself.
"""

from __future__ import annotations

import os
import socket
import time


class ScalarWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in ``log_dir``.

    Args:
        log_dir: the folder (created if missing).

    Example:

    >>> import tempfile
    >>> writer = ScalarWriter(tempfile.mkdtemp())
    >>> writer.scalar("loss", 0.5, step=1)
    >>> writer.close()
    """

    def __init__(self, log_dir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(log_dir, name)
        self._file = open(self.path, "wb")
        self._records = RecordWriter(self._file)
        self._event = event_pb2.Event
        self._write(self._event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Writes ``value`` under ``tag`` at ``step``."""
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]
        )
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        """Writes buffered events to disk."""
        self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file."""
        self._file.close()
