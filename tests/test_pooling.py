import torch

from llmret.retrieval import pooling


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


def test_mean_last_k_averages_the_last_attended_tokens():
    import pytest

    hidden = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    # right padding: row 0 keeps positions 2 and 3; left padding: positions 3 and 4; row 1: 3 and 4.
    got = pooling.pool("mean_last_2", hidden, right)
    assert torch.equal(got, torch.stack([hidden[0, 2:4].mean(0), hidden[1, 3:5].mean(0)]))
    assert torch.equal(pooling.pool("mean_last_2", hidden, left), hidden[:, 3:5].mean(1))
    short = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])  # fewer than K attended: all of them
    assert torch.equal(pooling.pool("mean_last_8", hidden, short)[0], hidden[0, :2].mean(0))
    assert torch.equal(pooling.pool("mean_last_1", hidden, right), pooling.last_token(hidden, right))
    for bad in ("mean_last_0", "mean_last_", "mean_last_x", "last2"):
        with pytest.raises(ValueError, match="pooling must be one of"):
            pooling.check_pooling(bad)
