"""Worker telemetry carries numbers only: an engine figure of another type (a list of pids, say) is
left out, because the supervisor refuses a whole message whose telemetry holds one."""

from hypothesis import given, strategies as st

from qvl.protocol.messages import parse_telemetry
from qvl.worker.telemetry import Telemetry

figures = st.dictionaries(st.text(max_size=8), st.one_of(
    st.integers(), st.floats(), st.booleans(), st.none(), st.text(), st.lists(st.integers())), max_size=20)


@given(figures, figures)
def test_what_the_worker_reads_is_what_the_supervisor_accepts(engine, model_process):
    read = Telemetry(lambda: dict(model_process), lambda: dict(engine)).read()
    assert parse_telemetry(read) == read
    merged = {"num_ooms": 0, **engine, **model_process}
    assert read == {k: v for k, v in merged.items() if type(v) in (int, float)}


def test_a_list_among_the_engine_figures_is_left_out_and_the_rest_kept():
    read = Telemetry(lambda: {"rss_bytes": 7}, lambda: {"kv_cache_usage": 0.5, "render_pids": [11, 12]}).read()
    assert read == {"num_ooms": 0, "kv_cache_usage": 0.5, "rss_bytes": 7}
