"""Stage 3, the activation engine: the model, its hooked layers, and every forward pass.

Owns the activation fingerprint and the two caches' layouts. Finds the checkpoint (:mod:`.checkpoints`),
loads the model weight-less until a text must be forwarded (:mod:`.models`, device maps in
:mod:`.placement`), resolves the decoder layers (:mod:`.layers`), captures the residual stream after
them (:mod:`.capture`, :mod:`.activations`), tokenises inputs (:mod:`.inputs`), forwards each input at
most once (:mod:`.forward`), keeps pooled activations in a content-addressed cache (:mod:`.cache` over
:mod:`.shard_store`) and per-token activations of a bounded sample (:mod:`.token_sample`,
:mod:`.token_cache`), and splits the forward work into shards (:mod:`.shards`). :mod:`.fast_path` says
which linear-attention kernels ran. The only stage that runs a forward pass.
"""
