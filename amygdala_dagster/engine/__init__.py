"""Stage 3, the activation engine: the model, its hooked layers, and every forward pass.

Loads the model (:mod:`.models`, weight-less until a text must be forwarded), resolves the
decoder layers (:mod:`.layers`), captures the residual stream after them (:mod:`.activations`),
keeps pooled activations in a content-addressed cache (:mod:`.cache`) and splits the forward work
into shards (:mod:`.shards`). The only stage that imports torch for a forward pass.
"""
