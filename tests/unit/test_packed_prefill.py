"""The packed prefill's pure parts: the token buckets its graphs are captured for, and the mask
that keeps each packed prompt's attention causal and to itself."""
import torch
from hypothesis import given, settings, strategies as st

from qvl.worker.kv_pool import LENGTH_BUCKET, _segment_mask
from qvl.worker.packed_prefill import token_bucket


@settings(deadline=None)
@given(st.integers(1, 1 << 20))
def test_a_bucket_holds_its_tokens_and_pads_by_at_most_an_eighth_or_one_length_bucket(tokens):
    bucket = token_bucket(tokens)
    assert bucket >= tokens and bucket % LENGTH_BUCKET == 0
    assert bucket - tokens < max(LENGTH_BUCKET, tokens / 4)  # an eighth of the power of two above it
    assert token_bucket(bucket) == bucket  # a bucket is its own bucket: the graph for it serves it


def test_the_buckets_up_to_8192_tokens_are_few():
    assert len({token_bucket(n) for n in range(1, 8193)}) == 16


@settings(deadline=None)  # the first example pays for torch's first operations
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6))
def test_a_packed_prompt_attends_causally_to_itself_alone(lengths):
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = _segment_mask(segments)[0, 0]
    start = 0
    expected = torch.zeros_like(mask)
    for n in lengths:
        expected[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    assert torch.equal(mask, expected)
