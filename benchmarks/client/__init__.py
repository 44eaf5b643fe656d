"""The load-test client behind ``loopserve bench serve``: works against any OpenAI-compatible
server and reports in vLLM's benchmark conventions, so numbers are comparable across servers."""
