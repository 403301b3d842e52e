"""fedsp: federated fine-tuning of a private LLM with soft prompts as messengers (FedSP).

The Python API, at the package root:

* :class:`RunConfig`: every setting of a run (the same keys as ``fedsp run``'s options);
* :func:`run`: run a course, on bundled tasks or your own rows held in memory, and get a :class:`Run`;
* :func:`load_run`: open a finished results folder; :meth:`Run.evaluate`, :meth:`Run.generate` and
  :meth:`Run.export` use its best prefix;
* :class:`FedSPError`: every problem with the input, in one line naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedsp.config import RunConfig
from fedsp.errors import FedSPError
from fedsp.version import __version__

if TYPE_CHECKING:
    from fedsp.api import Run, load_run, run

__all__ = ["FedSPError", "Run", "RunConfig", "__version__", "load_run", "run"]


def __getattr__(name: str) -> Any:
    # run / load_run / Run need torch and transformers (seconds to import): imported when first used, so
    # `import fedsp.config` (a Flower ClientApp's first step) stays light
    if name in ("Run", "load_run", "run"):
        from fedsp import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedsp' has no attribute {name!r}")
