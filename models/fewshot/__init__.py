"""Few-shot weight generation on the shared task network: MAML, HyperMAML, HyperTransformer, MetaDiff.

Every method consumes an `EpisodeBatch` (models.fewshot.episodes) and produces task-network weights
`w` [B, P] in the layout of `models.task_net.WeightLayout`, evaluated with the same functional forward.
"""

# The few-shot methods, in table order (kept here, free of torch, so configs can name them cheaply).
METHODS = ("maml", "fomaml", "hypermaml", "hypertransformer", "metadiff")
