"""The divergence's modes and chunk sizes: `divergence.py`'s defaults, which `SDFTConfig` offers as its own.

A module of its own, without torch, because `config.py` needs these facts and `import sdft_ds` (config, recipes,
`sdft-train --help`) must not load torch (1.8 s of a 0.1 s command); importing them from `divergence.py` would.
"""

MODES = ("full", "topk", "sampled_token")  # supports of the divergence (SPEC §2); sampled_token needs alpha = 1
TOKEN_CHUNK = 128  # tokens per tile: 128 × a 152k vocabulary is a 78 MB fp32 tile
VOCAB_CHUNK = 262_144  # vocabulary rows per tile: one tile covers a whole 150k-260k vocabulary
