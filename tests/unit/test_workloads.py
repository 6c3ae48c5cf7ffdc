"""The benchmark workloads and percentile (`scripts/workloads.py`): the percentile is nearest-rank
(p99 of two samples is the larger, not the smaller), the workloads hold what they promise, and a
shorter list is a prefix of a longer one."""

import io
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from workloads import MIXED_LENGTHS, QUESTION, SHORT, mixed, percentile, uniform  # noqa: E402

from qvl.protocol.codec import Limits  # noqa: E402
from qvl.protocol.messages import GenerationParams  # noqa: E402


@pytest.mark.parametrize("values, q, expected", [
    ([1.0, 2.0], 50, 1.0),
    ([1.0, 2.0], 99, 2.0),               # the old formula gave the minimum here
    ([3.0], 1, 3.0),
    ([3.0], 100, 3.0),
    (list(range(1, 101)), 99, 99),
    (list(range(1, 101)), 50, 50),
    (list(range(1, 11)), 70, 7),         # 70 % of 10 is rank 7, however 0.7 * 10 rounds
    ([5, 1, 4, 2, 3], 50, 3),            # unsorted input
    (list(range(12)), 99, 11),
])
def test_percentile_is_nearest_rank(values, q, expected):
    assert percentile(values, q) == expected


@pytest.mark.parametrize("values, q", [([], 50), ([1.0], 0), ([1.0], 101)])
def test_percentile_refuses_what_has_none(values, q):
    with pytest.raises(ValueError):
        percentile(values, q)


def test_uniform_is_alike_and_greedy():
    items = uniform(3)
    assert all(Image.open(io.BytesIO(i.image)).size == (448, 448) for i in items)
    assert {(i.text, i.max_new_tokens, i.temperature, i.seed) for i in items} == {(QUESTION, 64, 0.0, None)}
    assert items[0].params() == {"max_new_tokens": 64, "min_new_tokens": 64, "temperature": 0.0, "top_p": 1.0}


def test_mixed_holds_every_kind_and_is_a_prefix_of_a_longer_list():
    items = mixed(60, seed=3)
    sizes = [None if i.image is None else Image.open(io.BytesIO(i.image)).size for i in items]
    assert sizes.count(None) == 12  # a fifth text-only
    assert set(sizes) == {(224, 224), (448, 448), (896, 672), (1344, 896), None}
    assert {i.max_new_tokens for i in items} == set(MIXED_LENGTHS) and SHORT == 16
    sampled = [i for i in items if i.temperature > 0]
    greedy = [i for i in items if i.temperature == 0]
    assert sampled and greedy
    assert all(i.top_p == 0.9 and i.temperature == 0.7 and i.seed is not None for i in sampled)
    assert all(i.seed is None and i.top_p == 1.0 for i in greedy)
    assert [(i.max_new_tokens, i.seed) for i in mixed(20, seed=3)] == [(i.max_new_tokens, i.seed) for i in items[:20]]
    assert [i.seed for i in mixed(20, seed=4)] != [i.seed for i in items[:20]]
    for item in items:  # what the benchmark sends is a valid request
        GenerationParams.parse(item.params(), Limits())
        assert item.messages()[0]["content"][-1] == {"type": "text", "text": item.text}
