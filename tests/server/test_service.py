"""The server side on tiny models: validation and defaults (server.params), generation and GPU time
(server.service), "as code" (server.snippets), model loading and profiles."""

import ast
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sega
from sega import SegaFluxPipeline, SegaPipeline
from server import limits, loading, profiles, service, snippets
from server import params as api
from server.concepts import CONCEPT_KEYS
from server.loading import LoadedModel, load_pipeline
from server.profiles import DEMO_PROFILE, SD_PROFILE
from tests.tiny import tiny_components

LIMITS = api.Limits(max_steps=50, max_size=64, max_concepts=3, max_prompt_chars=200)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    pipe = SegaPipeline(**tiny_components())
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id="tiny", profile=profiles.profile_for(pipe), fallback_reason=None,
                       device="cpu")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    SegaPipeline(**tiny_components()).save_pretrained(path)
    return path


def parse(loaded, **raw):
    return api.parse_request(loaded, {"prompt": "a red circle", **raw}, LIMITS)


def error(loaded, **raw) -> str:
    with pytest.raises(api.InvalidInput) as info:
        parse(loaded, **raw)
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_defaults_fill_every_optional_parameter(tiny):
    p = parse(tiny)
    d = tiny.profile.defaults
    assert (p.steps, p.guidance_scale, p.values["momentum_scale"], p.values["momentum_beta"]) == (
        d["steps"], d["guidance_scale"], d["momentum_scale"], d["momentum_beta"])
    assert p.width == p.height == tiny.native_size == 16
    assert p.concepts == () and p.values["negative_prompt"] == "" and p.scheduler == "DDIM"
    assert 0 <= p.seed <= api.MAX_SEED


@pytest.mark.parametrize("field", ["seed", "steps", "guidance_scale", "width", "height", "momentum_scale",
                                   "momentum_beta"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1, 10**12, "3", True, [1]])
def test_every_numeric_field_rejects_bad_values(tiny, field, bad):
    message = error(tiny, **{field: bad})
    assert message.startswith(f"{field} must be")
    assert "[" in message  # the allowed range is named


@pytest.mark.parametrize("field", ["seed", "steps", "guidance_scale", "width", "height", "momentum_scale",
                                   "momentum_beta"])
@pytest.mark.parametrize("huge", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_integers_too_large_for_a_float_get_the_documented_error(tiny, field, huge):
    message = error(tiny, **{field: huge})
    assert message.startswith(f"{field} must be") and "integer of about" in message and len(message) < 120
    assert error(tiny, concepts=[{"prompt": "blue", "warmup": huge}]).startswith("concepts[0].warmup must be")


@pytest.mark.parametrize("field", ["seed", "steps", "width", "height"])
def test_integer_fields_reject_fractions(tiny, field):
    assert "fraction" in error(tiny, **{field: 16.5})


def test_steps_and_size_limits(tiny):
    assert error(tiny, steps=0) == "steps must be an integer in [1, 50], got 0"
    assert "[1, 50]" in error(tiny, steps=51)
    assert parse(tiny, steps=50).steps == 50
    assert error(tiny, width=20) == "width must be a multiple of 8 in [8, 64], got 20"
    assert "height must be" in error(tiny, height=72)
    assert parse(tiny, width=24.0, height=64).width == 24  # JSON numbers may arrive as floats


def test_prompt_is_required_and_text(tiny):
    with pytest.raises(api.InvalidInput, match="prompt is required"):
        api.parse_request(tiny, {}, LIMITS)
    assert error(tiny, prompt="   ") == "prompt must be non-empty text"
    assert error(tiny, prompt=5) == "prompt must be a string, got int"
    assert "at most 200 characters" in error(tiny, prompt="a" * 201)
    assert "negative_prompt must be a string" in error(tiny, negative_prompt=["x"])


def test_control_characters_are_removed_with_a_notice(tiny):
    p = parse(tiny, prompt="a red\x00 circle\non\ta white\x1b background\x7f", negative_prompt="blue\r")
    assert p.values["prompt"] == "a red circle on a white background"
    assert p.values["negative_prompt"] == "blue"
    assert any("prompt: removed 5 control" in n for n in p.notices)
    assert any("negative_prompt: removed 1" in n for n in p.notices)


def test_long_prompt_is_truncated_with_a_notice_not_an_error(tiny):
    limit = tiny.pipe.tokenizer.model_max_length
    p = parse(tiny, prompt=" ".join(["red"] * limit + ["blue"]))
    notice = next(n for n in p.notices if "token limit" in n)
    assert f"{limit}-token" in notice and "blue" in notice


@pytest.mark.parametrize("bad", ["blue", {"prompt": "blue"}, 3, True])
def test_concepts_must_be_a_list(tiny, bad):
    assert error(tiny, concepts=bad).startswith("concepts must be a list of objects (up to 3)")


def test_null_concepts_mean_none(tiny):
    assert parse(tiny, concepts=None).concepts == ()


def test_too_many_concepts(tiny):
    assert error(tiny, concepts=[{"prompt": "blue"}] * 4) == "concepts may hold at most 3 concepts, got 4"


@pytest.mark.parametrize("concept, expected", [
    ({"prompt": ""}, "concepts[0].prompt must be non-empty text"),
    ({"prompt": " \n "}, "concepts[0].prompt must be non-empty text"),
    ({"scale": 3}, "concepts[0].prompt is required"),
    ({"prompt": 7}, "concepts[0].prompt must be a string, got int"),
    ({"prompt": "blue", "colour": "x"}, "concepts[0] has unknown key(s) colour"),
    ({"prompt": "blue", "scale": "5"}, "concepts[0].scale must be a number in [0, 100]"),
    ({"prompt": "blue", "scale": math.nan}, "concepts[0].scale must be a number in [0, 100]"),
    ({"prompt": "blue", "threshold": 1.0}, "concepts[0].threshold must be a number in [0, 1)"),
    ({"prompt": "blue", "warmup": 2.5}, "concepts[0].warmup must be an integer in [0, 10000], got the fraction"),
    ({"prompt": "blue", "warmup": -1}, "concepts[0].warmup must be an integer in [0, 10000]"),
    ({"prompt": "blue", "cooldown": math.inf}, "concepts[0].cooldown must be an integer in [0, 10000] or None"),
    ({"prompt": "blue", "weight": -2}, "concepts[0].weight must be a number in [0, 100]"),
    ({"prompt": "blue", "reverse": "yes"}, "concepts[0].reverse must be true or false"),
    ({"prompt": "blue", "preset": "nope"}, "concepts[0].preset must be one of"),
    ("blue", "concepts[0] must be an object"),
])
def test_bad_concepts_name_the_field(tiny, concept, expected):
    assert error(tiny, concepts=[concept]).startswith(expected)


def test_the_error_names_which_concept(tiny):
    assert error(tiny, concepts=[{"prompt": "blue"}, {"prompt": "red", "scale": -1}]).startswith("concepts[1].scale")


def test_presets_fill_missing_keys_and_explicit_keys_win(tiny):
    presets = tiny.profile.presets.table()
    default = presets[tiny.profile.defaults["default_preset"]]
    p = parse(tiny, concepts=[{"prompt": "blue"}, {"prompt": "black background", "preset": "background", "scale": 2},
                              {"prompt": "large", "reverse": True, "cooldown": 8, "weight": 0.5}])
    a, b, c = p.concepts
    assert (a.scale, a.threshold, a.warmup) == (default["scale"], default["threshold"], default["warmup"])
    assert a.reverse is False and a.cooldown is None and a.weight == 1.0
    assert (b.scale, b.threshold, b.warmup) == (2.0, presets["background"]["threshold"], presets["background"]["warmup"])
    assert c.reverse is True and c.cooldown == 8 and c.weight == 0.5


def test_sd_presets_are_used_for_sd_models(tiny):
    sd = LoadedModel(pipe=tiny.pipe, model_id="sd", profile=SD_PROFILE, fallback_reason=None, device="cpu")
    p = api.parse_request(sd, {"prompt": "a woman", "concepts": [{"prompt": "smile", "preset": "face"}]}, LIMITS)
    assert p.concepts[0].threshold == SD_PROFILE.presets.table()["face"]["threshold"]
    assert "preset must be one of object, style, face, custom" in str(
        pytest.raises(api.InvalidInput, api.parse_request, sd,
                      {"prompt": "x", "concepts": [{"prompt": "y", "preset": "color"}]}, LIMITS).value)


def test_used_json_has_every_key_and_parses_back_to_the_same_request(tiny):
    p = parse(tiny, seed=5, concepts=[{"prompt": "blue", "preset": "shape"}])
    used = p.to_json()
    assert set(used) == {*api.API_PARAMS, "model"}
    assert set(used["concepts"][0]) == {"prompt", "scale", "threshold", "warmup", "cooldown", "reverse", "weight"}
    again = api.parse_request(tiny, {k: used[k] for k in api.API_PARAMS}, LIMITS)
    assert again == p


def test_notices_for_edits_that_cannot_apply(tiny):
    p = parse(tiny, steps=4, guidance_scale=1, concepts=[{"prompt": "blue", "warmup": 4}])
    assert any("never applied" in n for n in p.notices)
    assert any("guidance_scale 1 <= 1" in n for n in p.notices)


def test_scheduler_by_name(tiny):
    assert error(tiny, scheduler="PNDM").startswith("scheduler must be one of DDIM, DPM-Solver++, Euler")
    for name, cls in api.SCHEDULERS.items():
        built = parse(tiny, scheduler=name).pipeline_keywords()["scheduler"].build(tiny.pipe)
        assert isinstance(built, cls)


def test_limits_from_env():
    limits = api.Limits.from_env({"SEGA_MAX_STEPS": "20", "SEGA_MAX_SIZE": "256", "SEGA_MAX_CONCEPTS": "2",
                                      "SEGA_MAX_PROMPT_CHARS": "50"})
    assert limits == api.Limits(20, 256, 2, 50)
    assert api.Limits.from_env({}) == api.Limits(100, 1024, 6, 1000)
    with pytest.raises(ValueError, match="SEGA_MAX_STEPS must be a positive integer"):
        api.Limits.from_env({"SEGA_MAX_STEPS": "0"})


def test_queue_settings_from_env():
    assert limits.queue_settings({}) == (32, 1)
    assert limits.queue_settings({"SEGA_QUEUE_SIZE": "1", "SEGA_CONCURRENCY": "3"}) == (1, 3)
    with pytest.raises(ValueError, match="SEGA_CONCURRENCY must be a positive integer, got 'many'"):
        limits.queue_settings({"SEGA_CONCURRENCY": "many"})
    with pytest.raises(ValueError, match="SEGA_QUEUE_SIZE must be a positive integer"):
        limits.queue_settings({"SEGA_QUEUE_SIZE": "0"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
concept_strategy = st.dictionaries(st.sampled_from(CONCEPT_KEYS + ("bogus",)), json_values, max_size=5)

def field_strategy(p: api.Param, image: str) -> st.SearchStrategy:
    """Any JSON for one field, plus values of its own kind (so that valid requests are drawn too)."""
    own = {
        "text": st.text(max_size=30) | st.sampled_from(list(api.SCHEDULERS)),
        "json": st.lists(concept_strategy, max_size=4),
        "int": st.integers(0, 64),
        "float": st.floats(0, 64),
        # the uploaded file, by path or as gradio's file data, or somewhere it may not be read from
        "file": st.sampled_from([image, {"path": image}, {"path": image, "orig_name": "a.png"}, "/etc/passwd"]),
    }[p.kind]
    return own | json_values


@pytest.fixture(scope="module")
def upload(tmp_path_factory) -> str:
    from PIL import Image

    folder = tmp_path_factory.mktemp("uploads")
    Image.new("RGBA", (24, 20), (200, 30, 30, 128)).save(folder / "a.png")
    return str(folder / "a.png")


def request_strategy(endpoint: str, image: str) -> st.SearchStrategy:
    """Requests with any subset of the endpoint's fields, each any JSON value or one of its own kind."""
    return st.fixed_dictionaries({}, optional={p.name: field_strategy(p, image) for p in api.ENDPOINTS[endpoint]})


@pytest.mark.parametrize("endpoint", ["generate", "edit"])
def test_any_payload_is_accepted_or_gets_the_documented_error(tiny, upload, endpoint):
    # Every field of the endpoint is drawn (request_strategy reads them from the declarations).
    names = tuple(p.name for p in api.ENDPOINTS[endpoint])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(raw=request_strategy(endpoint, upload))
    def check(raw):
        try:
            p = api.parse_request(tiny, raw, LIMITS, endpoint, upload_roots=(str(Path(upload).parent),))
        except api.InvalidInput as exc:
            # a message that names a field of the request (or says what is required), never another crash
            assert str(exc).startswith(names), str(exc)
            return
        assert 1 <= p.steps <= LIMITS.max_steps and len(p.concepts) <= LIMITS.max_concepts
        assert p.values["prompt"].strip() if endpoint == "generate" else max(p.image.image.size) == tiny.native_size

    check()


ODD_VALUES = [[1], {}, [[1, [2]], {}], {"a": [1], "path": {}}, True, False]


@pytest.mark.parametrize("endpoint", ["generate", "edit"])
@pytest.mark.parametrize("odd", ODD_VALUES, ids=repr)
def test_odd_types_in_any_field_get_an_error_naming_it(tiny, upload, endpoint, odd):
    # Unhashable values (lists, objects), nested lists and bools where numbers or names go.
    valid = {"generate": {"prompt": "a red circle"}, "edit": {"image": upload}}[endpoint]
    for p in api.ENDPOINTS[endpoint]:
        with pytest.raises(api.InvalidInput) as info:
            api.parse_request(tiny, {**valid, p.name: odd}, LIMITS, endpoint, upload_roots=(str(Path(upload).parent),))
        assert str(info.value).startswith(p.name), (p.name, str(info.value))


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def test_generate_returns_both_images_and_the_used_parameters(tiny):
    p = parse(tiny, seed=3, steps=4, concepts=[{"prompt": "blue", "warmup": 1, "scale": 8, "threshold": 0.5}])
    r = service.generate(tiny, p)
    assert r.original.size == r.edited.size == (16, 16)
    assert not np.array_equal(np.asarray(r.original), np.asarray(r.edited))
    assert r.used == {**p.to_json(), "notices": [], "summary": r.summary, "cache_hit": False, "masks": []}
    assert r.used["seed"] == 3
    assert api.params_from_json(tiny, r.used, LIMITS) == p
    assert "+'blue'" in r.summary and "seed 3" in r.summary
    # The same request again: the same pair.
    r2 = service.generate(tiny, p)
    assert np.array_equal(np.asarray(r.original), np.asarray(r2.original))
    assert np.array_equal(np.asarray(r.edited), np.asarray(r2.edited))


def test_the_same_request_gives_the_same_pair_whatever_the_caches_hold(tiny):
    """Cold, warm with another request's entries, warm with the same prompt and seed and other concepts: the
    very same images, bit for bit (as PNG pixels, and as the floats the service's library call returns)."""
    pipe = tiny.pipe
    p = parse(tiny, seed=7, steps=5, momentum_scale=0.3,
              concepts=[{"prompt": "blue", "warmup": 1, "scale": 8, "threshold": 0.5},
                        {"prompt": "square", "warmup": 2, "reverse": True}])
    keywords = p.pipeline_keywords("pipe")

    def answer():
        r = service.generate(tiny, p)
        out = pipe(**{name: k.build(pipe) for name, k in keywords.items()}, output_type="np")
        return np.asarray(r.original), np.asarray(r.edited), out.original_images, out.images

    def library_call(request):  # a library user's call on the same pipeline
        return pipe(**{name: k.build(pipe) for name, k in request.pipeline_keywords("pipe").items()})

    cold = answer()
    assert not np.array_equal(cold[2], cold[3])
    service.generate(tiny, parse(tiny, prompt="a blue square", seed=8, steps=5, concepts=[{"prompt": "red"}]))
    library_call(parse(tiny, prompt="a green circle", seed=9, steps=5, concepts=[{"prompt": "large", "warmup": 1}]))
    after_others = answer()
    other_concepts = parse(tiny, seed=7, steps=5, momentum_scale=0.3, concepts=[{"prompt": "red", "warmup": 3}])
    service.generate(tiny, other_concepts)
    library_call(other_concepts)  # any cache now holds this prompt and seed's run without edits
    library_call(p)
    after_same_prompt = answer()
    for warm in (after_others, after_same_prompt):
        for a, b in zip(cold, warm):
            assert np.array_equal(a, b)


def test_generate_without_concepts_gives_the_same_image_twice(tiny):
    r = service.generate(tiny, parse(tiny, seed=4, steps=3, scheduler="Euler"))
    assert np.array_equal(np.asarray(r.original), np.asarray(r.edited))
    assert r.summary.startswith("no edits")


def test_a_set_stop_ends_the_run_before_its_next_step(tiny):
    seen, stop = [], threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done == 2:
            stop.set()

    with pytest.raises(sega.Stopped, match="after 2 of 6 steps"):
        service.generate(tiny, parse(tiny, seed=1, steps=6), stop=stop, progress_callback=progress)
    assert seen == [(1, 6), (2, 6)]


def test_gpu_duration_grows_with_work_and_stays_bounded():
    base = service.gpu_duration(50, 2, 512, 512)
    assert isinstance(base, int)
    assert service.gpu_duration(100, 2, 512, 512) > base
    assert service.gpu_duration(50, 6, 512, 512) > base
    assert service.gpu_duration(50, 2, 768, 768) > base
    assert service.gpu_duration(50, 0, 512, 512) < base
    assert service.gpu_duration(1, 0, 32, 32) == 15  # the floor: start-up is never free
    assert service.gpu_duration(10_000, 6, 2048, 2048) == 300
    assert service.gpu_duration(50, 4, 512, 512) <= 60  # the authors' example fits a default ZeroGPU slot


# ------------------------------------------------------------------------------------------------
# As code
# ------------------------------------------------------------------------------------------------


def test_client_snippet_is_python_with_every_api_parameter(tiny):
    p = parse(tiny, seed=9, concepts=[{"prompt": "it's \"quoted\"\\", "reverse": True}], scheduler="Euler")
    client, _ = snippets.as_code(p, url="http://127.0.0.1:9999/")
    tree = ast.parse(client)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "predict")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kwargs.pop("api_name") == "/generate"
    assert kwargs == p.api_kwargs()
    assert "Client('http://127.0.0.1:9999/')" in client
    assert kwargs["scheduler"] == "Euler"


def test_as_code_calls_the_space_or_the_address_the_visitor_used(tiny):
    assert snippets.app_address("someone/sega", {"host": "10.0.0.1"}, "http://10.0.0.1/") == "someone/sega"
    join = "gradio_api/queue/join?__theme=dark"
    assert snippets.app_address(None, {"host": "example.org:8080"}, f"http://example.org:8080/{join}") == \
        "http://example.org:8080/"
    assert snippets.app_address(None, {"host": "example.org"}, f"http://example.org/sega/{join}") == \
        "http://example.org/sega/"
    proxied = {"Host": "10.0.0.1:7860", "X-Forwarded-Host": "sega.example.com, proxy", "X-Forwarded-Proto": "https"}
    assert snippets.app_address(None, proxied, f"http://10.0.0.1:7860/{join}") == "https://sega.example.com/"
    assert snippets.app_address(None, {}, "") == snippets.LOCAL_URL
    client, _ = snippets.as_code(parse(tiny, seed=1), "someone/sega")
    assert "client = Client('someone/sega')\n" in client


def test_library_snippet_reproduces_the_app_result(tiny_dir, tmp_path, monkeypatch):
    loaded = load_pipeline(str(tiny_dir))
    loaded.pipe.set_progress_bar_config(disable=True)
    p = api.parse_request(loaded, {"prompt": "a large red circle", "seed": 11, "steps": 4,
                                       "scheduler": "DPM-Solver++", "negative_prompt": "small",
                                       "concepts": [{"prompt": "blue", "warmup": 1, "threshold": 0.5},
                                                    {"prompt": "square", "reverse": True, "cooldown": 3}]}, LIMITS)
    app_result = service.generate(loaded, p)
    _, library = snippets.as_code(p)
    monkeypatch.chdir(tmp_path)
    exec(compile(library, "as_code", "exec"), {})
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open("original.png")), np.asarray(app_result.original))
    assert np.array_equal(np.asarray(Image.open("edited.png")), np.asarray(app_result.edited))


def test_library_snippet_without_concepts_runs(tiny_dir, tmp_path, monkeypatch):
    loaded = load_pipeline(str(tiny_dir))
    _, library = snippets.as_code(api.parse_request(loaded, {"prompt": "red", "seed": 1, "steps": 2}, LIMITS))
    monkeypatch.chdir(tmp_path)
    exec(compile(library, "as_code", "exec"), {})
    assert (tmp_path / "edited.png").exists()


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_load_a_local_folder(tiny_dir):
    loaded = load_pipeline(str(tiny_dir), device="cpu")
    assert loaded.model_id == str(tiny_dir) and loaded.fallback_reason is None
    assert loaded.is_demo  # the tiny model uses the demo model's vocabulary
    assert loaded.device == "cpu" and loaded.pipe.unet.dtype == torch.float32


def test_model_from_env(tiny_dir, monkeypatch):
    monkeypatch.setenv("SEGA_MODEL", str(tiny_dir))
    assert load_pipeline(None, device="cpu").model_id == str(tiny_dir)


def test_a_missing_model_falls_back_to_the_bundled_one(tiny_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tiny_dir)
    missing = tmp_path / "no-such-model"
    with caplog.at_level("WARNING", logger="server.loading"):
        loaded = load_pipeline(str(missing), device="cpu")
    assert loaded.model_id == str(tiny_dir)
    assert str(missing) in loaded.fallback_reason and "bundled demo model" in loaded.fallback_reason
    assert loaded.fallback_reason in caplog.text


def test_default_model_depends_on_the_gpu(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.default_model() == str(loading.DEFAULT_MODEL_DIR)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert loading.default_model() == loading.SD_MODEL_ID


@pytest.mark.parametrize(("cls", "device", "dtype"), [
    (SegaPipeline, "cuda", torch.float16), (SegaFluxPipeline, "cuda", torch.bfloat16),
    (SegaPipeline, "cpu", torch.float32), (SegaFluxPipeline, "cpu", torch.float32)])
def test_weights_load_in_half_precision_on_a_gpu_and_float32_on_the_cpu(monkeypatch, tmp_path, cls, device, dtype):
    seen = {}

    class Loaded:
        def to(self, where):
            seen["device"] = where
            return self

    def fake_from_pretrained(model, **kwargs):
        seen.update(kwargs)
        return Loaded()

    monkeypatch.setattr(loading, "pipeline_class", lambda model: cls)
    monkeypatch.setattr(cls, "from_pretrained", fake_from_pretrained)
    loading._load(str(tmp_path), device, safety_checker=True)  # a local folder: FLUX loads on the CPU too
    assert seen["dtype"] == dtype and seen["device"] == device


def test_on_zerogpu_the_model_loads_onto_the_gpu_in_float16(monkeypatch, tmp_path):
    """ZeroGPU's main process has no CUDA of its own: the Space still loads for the GPU, in float16."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe, seen = SegaPipeline(**tiny_components()), {}
    monkeypatch.setattr(pipe, "to", lambda device: seen.update(device=device) or pipe)
    monkeypatch.setattr(loading, "pipeline_class", lambda model: SegaPipeline)
    monkeypatch.setattr(SegaPipeline, "from_pretrained", lambda model, **kwargs: seen.update(kwargs) or pipe)
    loaded = load_pipeline(str(tmp_path))
    assert (seen["device"], seen["dtype"], loaded.device) == ("cuda", torch.float16, "cuda")


def test_safety_checker_off_passes_none(monkeypatch):
    seen = {}

    def fake_from_pretrained(model, **kwargs):
        seen.update(kwargs)
        return SegaPipeline(**tiny_components())

    monkeypatch.setattr(SegaPipeline, "from_pretrained", fake_from_pretrained)
    load_pipeline("some/model", device="cpu", safety_checker=False)
    assert "safety_checker" in seen and seen["safety_checker"] is None
    assert "trust_remote_code" not in seen
    seen.clear()
    load_pipeline("some/model", device="cpu")
    assert "safety_checker" not in seen  # the model's own checker is kept


def test_model_fingerprint_tells_weights_apart(tiny):
    other = LoadedModel(pipe=SegaPipeline(**tiny_components(seed=1)), model_id="tiny", profile=DEMO_PROFILE,
                        fallback_reason=None, device="cpu")
    assert service.model_fingerprint(tiny) == service.model_fingerprint(tiny)
    assert service.model_fingerprint(tiny) != service.model_fingerprint(other)


def test_save_png_names_by_content_and_leaves_no_partial_files(tmp_path):
    import PIL.Image

    red = PIL.Image.new("RGB", (8, 8), (220, 30, 30))
    first = service.save_png(red, str(tmp_path))
    again = service.save_png(red.copy(), str(tmp_path))
    other = service.save_png(PIL.Image.new("RGB", (8, 8), (30, 60, 220)), str(tmp_path))
    assert first == again != other
    assert PIL.Image.open(first).getpixel((0, 0)) == (220, 30, 30)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["image.png", "image.png"]
    assert service.save_png(None, str(tmp_path)) is None


def test_steps_beyond_the_schedulers_training_timesteps_are_refused_naming_steps(tiny):
    generous = api.Limits(max_steps=2000)
    with pytest.raises(api.InvalidInput) as info:
        api.parse_request(tiny, {"prompt": "a red circle", "steps": 1500}, generous)
    assert str(info.value).startswith("steps must be an integer in [1, 1000]")
    assert api.parse_request(tiny, {"prompt": "a red circle", "steps": 1000}, generous).steps == 1000


def test_adding_a_parameter_is_one_declaration(tiny):
    # Everything about a parameter derives from its declaration: defaults, JSON, pipeline keywords, snippets.
    p = parse(tiny, seed=2, scheduler="Euler")
    assert set(api.defaults(tiny)) == set(api.API_PARAMS) == set(p.api_kwargs())
    keywords = p.pipeline_keywords()
    assert keywords["scheduler"].source == "EulerDiscreteScheduler.from_config(pipe.scheduler.config)"
    _, library = snippets.as_code(p)
    for name, keyword in keywords.items():
        assert f"    {name}={keyword.source},\n" in library


def test_uploaded_images_have_their_own_presets_on_the_demo_model(tiny, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    raw = {"image": str(tmp_path / "a.png"), "concepts": [{"prompt": "blue", "preset": "color"}]}
    edit = api.parse_request(tiny, raw, LIMITS, "edit", upload_roots=(str(tmp_path),))
    want = DEMO_PROFILE.presets.table("edit")["color"]
    assert (edit.concepts[0].scale, edit.concepts[0].threshold, edit.concepts[0].warmup) == (
        want["scale"], want["threshold"], want["warmup"])
    generate = parse(tiny, concepts=[{"prompt": "blue", "preset": "color"}])
    assert generate.concepts[0].threshold == DEMO_PROFILE.presets.table()["color"]["threshold"]


@pytest.mark.parametrize("endpoint", ["generate", "edit"])
def test_a_masked_request_takes_its_presets_from_the_mask_table(tmp_path, endpoint):
    from PIL import Image

    from tests.tiny import tiny_mask_components

    pipe = SegaPipeline(**tiny_mask_components())  # cross-attention where the masks need it
    tiny = LoadedModel(pipe=pipe, model_id="tiny", profile=DEMO_PROFILE, fallback_reason=None, device="cpu")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    raw = {"prompt": "a large red circle on a white background", "image": str(tmp_path / "a.png")}
    if endpoint == "edit":
        raw.pop("prompt")
    profile = DEMO_PROFILE
    assert profile.presets.has_masked(endpoint)  # the demo model has presets of its own for masked edits
    for mask in api.MASK_MODES:
        for name, want in profile.presets.table(endpoint, mask).items():
            concepts = [{"prompt": "blue", "preset": name}, {"prompt": "red", "preset": name, "scale": 2.5}]
            p = api.parse_request(tiny, {**raw, "concepts": concepts, "mask": mask}, LIMITS, endpoint,
                                  upload_roots=(str(tmp_path),))
            a, b = p.concepts
            assert (a.scale, a.threshold, a.warmup) == (want["scale"], want["threshold"], want["warmup"]), (mask, name)
            assert (b.scale, b.threshold) == (2.5, want["threshold"])  # an explicit key still wins
            if endpoint == "generate":  # the JSON of the parameters used parses back to the same request
                assert api.params_from_json(tiny, p.to_json(), LIMITS, endpoint) == p
    # the tables differ where the mask changes the threshold's meaning
    assert profile.presets.table(endpoint, "intersect") != profile.presets.table(endpoint, "none")


def test_every_attribute_of_a_request_reads_a_declared_parameter(tiny):
    """GenerationParams' attributes are a view of the declarations, never a second list of parameters."""
    declared = {p.name for params in api.ENDPOINTS.values() for p in params}
    views = {name for name, value in vars(api.GenerationParams).items() if isinstance(value, api.Declared)}
    assert "seed" in views and views <= declared
    p = parse(tiny, seed=5, steps=3)
    assert (p.seed, p.steps, p.width) == (5, 3, tiny.native_size) and p.values["seed"] == 5


def test_the_sdxl_profile_bounds_the_samples_per_unet_call():
    """The profile's max_samples_per_call reaches the library call: the largest request's UNet batch is split,
    and the images equal the library call that the snippet writes (the same keywords)."""
    from sega import SegaXLPipeline
    from server.profiles import SDXL_PROFILE
    from tests.tiny import tiny_xl_components

    pipe = SegaXLPipeline(**tiny_xl_components())
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedModel(pipe=pipe, model_id="tiny-xl", profile=SDXL_PROFILE, fallback_reason=None, device="cpu")
    params = parse(loaded, prompt="a red circle", seed=3, steps=2, width=16, height=16,
                   concepts=[{"prompt": word, "warmup": 0} for word in ("blue", "square", "large")])
    keywords = params.pipeline_keywords("pipe")
    limit = SDXL_PROFILE.library_keywords["max_samples_per_call"]
    assert keywords["max_samples_per_call"].build(pipe) == limit
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    try:
        result = service.generate(loaded, params)
    finally:
        hook.remove()
    # The pair and three concepts: 2 + 2 + 3 = 7 samples a step, in calls of at most the profile's bound.
    assert max(batches) <= limit and sum(batches) == 2 * 7
    out = pipe(**{name: k.build(pipe) for name, k in keywords.items()}, output_type="pil")
    assert np.array_equal(np.asarray(result.edited), np.asarray(out.images[0]))
