"""The DataLoader every stage reads through: an error raised in a worker reaches the main process as raised.

torch sends a worker's exception back as its type and formatted traceback only, and rebuilds it by calling
`type(text)` (`torch._utils.ExceptionWrapper.reraise`); a type that takes other arguments (`SampleError`'s
`reason`, `DamagedFileError`'s `path`) becomes a RuntimeError, and even one that does not arrives with the
traceback as its message. So each item is read through `CarryErrors`: in a worker, an exception is pickled
into the text of a `WorkerError`, which `Loader` unpickles and raises in its place. The main process then sees
what it would with `num_workers=0` (the type, message and attributes: one line and exit 2 for bad input, the
pipeline's repair of a `DamagedFileError`), with the worker's traceback as a note for the log.
"""

from __future__ import annotations

import base64
import pickle
import re
import traceback
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, get_worker_info

_CARRIED = re.compile(r"\[carried: ([A-Za-z0-9+/=]+)\]")


class WorkerError(RuntimeError):
    """An exception of a DataLoader worker, pickled into the message (the one thing torch sends back whole).

    Args:
        text: `WorkerError.carrying`'s message, or torch's rebuilt text that ends with it.

    Attributes:
        original: The worker's exception, its traceback as a note; None if the text holds none.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        found = _CARRIED.findall(text)
        self.original: BaseException | None = None
        if found:
            error, note = pickle.loads(base64.b64decode(found[-1]))
            error.add_note(note)
            self.original = error

    @classmethod
    def carrying(cls, error: BaseException, worker_id: int) -> WorkerError | None:
        """The WorkerError that carries `error`, or None if `error` does not survive pickling."""
        note = f"raised in DataLoader worker process {worker_id}:\n" + "".join(traceback.format_exception(error))
        try:
            blob = base64.b64encode(pickle.dumps((error, note))).decode()
            carried = cls(f"{type(error).__name__}: {error} [carried: {blob}]")
        except Exception:
            return None
        return carried


class CarryErrors(Dataset):
    """`dataset`'s items; in a DataLoader worker, an exception is raised as the `WorkerError` carrying it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except Exception as e:
            worker = get_worker_info()
            carried = None if worker is None else WorkerError.carrying(e, worker.id)
            if carried is None:
                raise
            raise carried from None


class Loader(DataLoader):
    """torch's DataLoader over `CarryErrors(dataset)` (same arguments); `dataset` stays `.items`."""

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(CarryErrors(dataset), *args, **kwargs)
        self.items = dataset

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except WorkerError as e:
                if e.original is None:
                    raise
                original = e.original
            else:
                yield batch
                continue
            # Shut the workers down before the error travels up. Dropping the iterator is not enough: a reference
            # cycle keeps it alive until a garbage collection, and that late shutdown took 10-20 s here.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del batches
            raise original
