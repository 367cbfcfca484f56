import torch

from llmret import pooling


def test_last_token_handles_right_and_left_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pooling.last_token(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(pooling.last_token(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_mean_ignores_padding_and_cls_takes_first():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pooling.mean(hidden, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pooling.pool("cls", hidden, mask), torch.tensor([[1.0, 2.0]]))


def test_unknown_pooling_is_refused():
    import pytest

    with pytest.raises(ValueError, match="pooling must be one of"):
        pooling.pool("max", torch.zeros(1, 1, 1), torch.ones(1, 1))
