"""How options' values are spelled: the words a user writes, shared by the configuration and the code
that acts on them.

A leaf: it imports nothing, so the configuration (which checks a value), the wire encoding
(:mod:`fedsp.wire`) and the models (:mod:`fedsp.models.embedding`, :mod:`fedsp.models.vocabulary`,
:mod:`fedsp.models.auxiliary`) read one spelling without importing one another. No torch here: a
ClientApp process reads a configuration first, and torch and transformers take seconds to import.
Which methods and engines exist is the method table's (:mod:`fedsp.methods.table`, a leaf too).
"""

from __future__ import annotations

# --wire-dtype: how each round's messages are encoded (fedsp.wire)
FLOAT32, BFLOAT16, INT8 = "float32", "bfloat16", "int8"
WIRE_DTYPES = (FLOAT32, BFLOAT16, INT8)
STATE_MOMENTS = (FLOAT32, BFLOAT16)  # --state-moments: how a client keeps its AdamW moments between rounds

# --aux-embedding: the auxiliary model's embedding (fedsp.models.embedding, fedsp.models.vocabulary)
FULL, LOWRANK, PRUNED = "full", "lowrank", "pruned"

PARTITIONS = ("iid", "dirichlet", "by:FIELD")  # by:FIELD: each client whole groups of a row field
PREFIX_INITS = ("tokens", "random")
LAYER_ORDERS = ("cyclic", "blocks")  # --aux-layer-order (fedsp.models.auxiliary.depth_plan)
# --kd-objective (fedsp.methods.kd): what the auxiliary model is distilled to match
HIDDEN, LOGITS, BOTH = "hidden", "logits", "both"
KD_OBJECTIVES = (HIDDEN, LOGITS, BOTH)
