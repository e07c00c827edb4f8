"""Each compile test starts from a fresh dynamo cache: the optimizers share step code objects,
so compiled tests earlier in the session would otherwise count against the recompile limit."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    if "compile" in request.node.name:
        torch._dynamo.reset()
    yield
