"""Tools for developing and measuring kvpool, not for serving: the tiny generated model and its
corpus, the TTFT harness, local server processes on free ports, the settings reference generator.
`kvpool demo` and `kvpool bench` use them; nothing in the vLLM payload does."""
