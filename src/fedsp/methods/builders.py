"""The method table's callables: how each method's parties are built, how a Flower node makes its client,
and which global layers its clients may hold.

:mod:`fedsp.methods.table` says what each method is (plain data, read by the configuration, which every
method module imports); this module binds each trained method's name to its own module's functions, as
real callables that type checkers and editors follow. The runtime reads it; nothing under ``methods/``
does. A test keeps the two in step: every method that trains has parts here, and only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedsp.config import RunConfig
from fedsp.data.shards import RunData
from fedsp.methods import centralised, fedsp, local_only, offsite, sfprompt
from fedsp.methods.base import Client, Course
from fedsp.methods.table import spec_for
from fedsp.models.loading import LoadedModel

Builder = Callable[[RunConfig, LoadedModel, RunData], Course]
# (config, uninitialised global architecture, the client's layers, the shipped weights, rows, partition,
# pad id, tokenizer) -> the method's client on a Flower node
NodeClient = Callable[..., Client]
Promise = Callable[[RunConfig, int], set[int]]


@dataclass(frozen=True)
class Parts:
    """A trained method's functions."""

    course: Builder  # its server and clients for a run
    node_client: NodeClient | None = None  # its client on a Flower node; None: it has no clients
    # the global layers its clients may hold (config, number of layers) -> set; the model-privacy audit
    # checks that no other layer crosses the wire
    promise: Promise = fedsp.promised_layers


_FEDSP = Parts(fedsp.fedsp_course, fedsp.node_client)
PARTS: dict[str, Parts] = {
    "fedsp": _FEDSP,
    "fedprompt": _FEDSP,
    "fedprompt-single": _FEDSP,
    "server-only": Parts(centralised.server_only_course),
    "fedsp-no-kd": _FEDSP,
    "fedsp-no-cs": _FEDSP,
    "fedsp-no-at": _FEDSP,
    "prefix-tuning": Parts(centralised.prefix_tuning_course),
    "local-only": Parts(local_only.local_only_course),
    "finetune": Parts(centralised.finetune_course),
    "sfprompt": Parts(sfprompt.sfprompt_course, sfprompt.node_client, sfprompt.promised_layers),
    "offsite-tuning": Parts(offsite.offsite_course, offsite.node_client, offsite.promised_layers),
}


def parts_for(method: str) -> Parts:
    """The functions of ``method``; a method that trains nothing (zero-shot) has none."""
    if not spec_for(method).trains:
        raise RuntimeError(f"method {method!r} trains nothing")
    return PARTS[method]


def build_course(config: RunConfig, loaded: LoadedModel, data: RunData) -> Course:
    """The parties of a run of ``config.method``, built by the method's own builder from the loaded model
    and the run's data."""
    return parts_for(config.method).course(config, loaded, data)


def node_client_for(method: str) -> NodeClient | None:
    """How a Flower node makes a client of ``method`` (None: the method has no clients)."""
    parts = PARTS.get(method)
    return parts.node_client if parts else None


def promised_layers(config: RunConfig, num_layers: int) -> set[int]:
    """The global layers (of ``num_layers``) that the clients of ``config.method`` may hold; a method
    that trains nothing is held to FedSP's promise."""
    parts = PARTS.get(config.method)
    return (parts.promise if parts else fedsp.promised_layers)(config, num_layers)
