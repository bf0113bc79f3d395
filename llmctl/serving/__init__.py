"""`llmctl serve`: the generation engine (KV cache, continuous batching) and the HTTP API over it.

`llmctl.serving.engine` holds the engine's interface (Engine, GenerationRequest, TokenEvent,
RequestHandle); `llmctl.serving.batch` the running batch it steps. Submodules import torch; this
package module imports nothing heavy.
"""
