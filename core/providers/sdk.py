"""Provider SDKs imported off the critical path.

``import anthropic`` alone takes 1.5–2 s (it loads every type the API has), ``import openai``
about 0.5 s. A provider module therefore never imports its SDK at module level: building the
provider starts the import in a background thread, and the first request waits for it. In the
terminal chat the import then runs while the store opens and the user types the first question.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from concurrent.futures import Future
from types import ModuleType


class SdkImport:
    """The module ``name``, imported in a background thread from construction on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._future: Future[ModuleType] = Future()
        loaded = sys.modules.get(name)
        if loaded is not None:
            self._future.set_result(loaded)
            return
        # A daemon thread: an interrupted start-up must not wait for an import nobody needs.
        threading.Thread(target=self._load, name=f"import {name}", daemon=True).start()

    def _load(self) -> None:
        try:
            module = importlib.import_module(self.name)
        except BaseException as error:  # handed to whoever waits: re-raised there
            self._future.set_exception(error)
        else:
            self._future.set_result(module)

    def module(self) -> ModuleType:
        """The SDK module, waiting for its import (blocking: not for the event loop's thread)."""
        return self._future.result()

    async def ready(self) -> ModuleType:
        """The SDK module, waiting for its import without blocking the event loop."""
        if self._future.done():
            return self._future.result()
        return await asyncio.wrap_future(self._future)

    @property
    def loaded(self) -> bool:
        """Whether the import has finished (successfully or not)."""
        return self._future.done()


__all__ = ["SdkImport"]
