"""embedserve.client and the operators' metrics on /metrics, against a real server (started the
way `make serve` does) with an index and an API key; and /metrics with two workers."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from embedserve.client import Added, APIError, AsyncClient, Client, Neighbour
from embedserve.package import load_package
from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.server import build_index, running

pytestmark = pytest.mark.slow

KEY = "client-test-key-3a9d0e5b7c"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = load_package().name


def arrays(n: int, seed: int = 0, size: int = 72) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [make_pattern(i % 4, 4, size, rng) for i in range(n)]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client")
    folder = write_image_folder(root / "gallery", num_classes=3, per_class=3, size=48, seed=11)
    return build_index(folder, root / "index")


def own_metrics(home: Path) -> dict[str, str]:
    """A BENTOML_HOME of the server's own: `bentoml serve` empties the metrics directory under
    it when it starts, and /metrics merges every file there, so two servers sharing one (the
    other server of this module, or of another test run) would see or erase each other's."""
    return {"BENTOML_HOME": str(home)}


@pytest.fixture(scope="module")
def server(index_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {"EMBEDSERVE_API_KEY": KEY, "EMBEDSERVE_INDEX": str(index_dir), **own_metrics(home)}
    with running(env, tmp_path_factory.mktemp("log") / "server.log") as srv:
        yield srv


def post_embed(server, images: list[bytes]) -> np.ndarray:
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(server.url + "/embed", files=files, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], np.float32)


def test_the_client_embeds_arrays_pil_images_bytes_and_paths_as_embed_does(server, tmp_path):
    images = arrays(3, seed=1)
    expected = post_embed(server, [png(a) for a in images])
    path = tmp_path / "two.png"
    path.write_bytes(png(images[2]))
    with Client(server.url, api_key=KEY, timeout=60) as client:
        got = client.embed(images)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)  # the same pixels, the same floats
        mixed = client.embed([Image.fromarray(images[0]), png(images[1]), path])
        np.testing.assert_array_equal(mixed, expected)
        np.testing.assert_array_equal(client.embed(images[0]), expected[:1])
        assert client.info()["model"]["name"] == MODEL


def test_the_client_searches_and_adds_with_the_key(server):
    query = arrays(2, seed=2)
    files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(query)]
    raw = httpx.post(server.url + "/search", files=files, data={"k": "3"}, headers=AUTH).json()
    with Client(server.url, api_key=KEY) as client:
        hits = client.search(query, k=3)
        assert [[(n.id, n.path, n.label) for n in r] for r in hits] == [
            [(n["id"], n["path"], n["label"]) for n in r["neighbours"]] for r in raw["results"]
        ]
        assert all(isinstance(n, Neighbour) for r in hits for n in r)
        size = client.info()["index"]["size"]
        new = arrays(1, seed=3, size=90)[0]
        added = client.add([new], paths=["new/one.png"], labels=["new"])
        assert isinstance(added, Added) and added.index_size == size + 1 and len(added.ids) == 1
        best = client.search(new, k=1)[0][0]
        assert (best.id, best.path, best.label) == (added.ids[0], "new/one.png", "new")
        assert best.score == pytest.approx(1.0, abs=1e-4)


def test_client_errors_carry_the_status_message_and_files(server):
    with Client(server.url, api_key="wrong-key-0123456789") as client, pytest.raises(APIError) as e:
        client.embed(arrays(1)[0])
    assert e.value.status == 401 and e.value.message.startswith("wrong API key")
    with Client(server.url, api_key=KEY) as client:
        with pytest.raises(APIError) as e:
            client.embed([png(arrays(1)[0]), b"%PDF-1.4 not an image"])
        assert e.value.status == 415
        assert [f["file"] for f in e.value.files] == ["images[1] (image1)"]
    with Client(server.url) as client, pytest.raises(APIError) as e:  # no key: adding is refused
        client.add([arrays(1)[0]])
    assert e.value.status == 401


def test_the_async_client(server):
    images = arrays(4, seed=4)
    expected = post_embed(server, [png(a) for a in images])

    async def run():
        async with AsyncClient(server.url, api_key=KEY, timeout=60) as client:
            return await asyncio.gather(
                client.embed(images[:2]), client.embed(images[2:]), client.search(images[0], k=2)
            )

    first, second, hits = asyncio.run(run())
    np.testing.assert_array_equal(np.concatenate([first, second]), expected)
    assert len(hits) == 1 and len(hits[0]) == 2 and hits[0][0].score >= hits[0][1].score


def test_filters_more_like_this_thumbnails_replace_and_delete_end_to_end(server):
    """The index's endpoints of a real server (its decode pool makes the thumbnails) through
    the client; the index was built by the command line, which stored thumbnails too."""
    with Client(server.url, api_key=KEY, timeout=60) as client:
        built = Image.open(io.BytesIO(client.thumbnail(0)))
        assert built.format == "JPEG" and built.size == (48, 48)  # smaller than 128: as it is
        labels = client.labels()
        assert labels["class_1"] == 3 and set(labels) >= {"class_0", "class_1", "class_2"}
        hits = client.search(arrays(1, seed=5)[0], k=5, labels=["class_1"])[0]
        assert len(hits) == 3 and {h.label for h in hits} == {"class_1"}
        more = client.search_by_id(hits[0].id, k=3, labels="class_1", min_score=-1)
        assert len(more) == 2 and hits[0].id not in [h.id for h in more]
        big = arrays(1, seed=6, size=400)[0]
        first = client.add([big], paths=["e2e/a.png"], labels=["e2e"])
        thumb = Image.open(io.BytesIO(client.thumbnail(first.ids[0])))
        assert thumb.format == "JPEG" and max(thumb.size) == 128
        second = client.add([arrays(1, seed=7)[0]], paths=["e2e/a.png"], replace=True)
        assert second.replaced == first.ids and second.index_size == first.index_size
        with pytest.raises(APIError) as e:
            client.item(first.ids[0])
        assert e.value.status == 404
        deleted = client.delete(paths=["e2e/a.png"], ids=[10**6])
        assert deleted.deleted == second.ids and deleted.missing_ids == [10**6]
        assert deleted.index_size == first.index_size - 1
        found = client.search(big, k=50)[0]
        assert not {h.id for h in found} & {*first.ids, *second.ids}
        assert client.info()["index"]["size"] == deleted.index_size
    with Client(server.url) as anonymous, pytest.raises(APIError) as e:
        anonymous.delete(ids=[0])
    assert e.value.status == 401


def test_bentomls_own_client_has_none_of_these_endpoints(server):
    """bentoml.SyncHTTPClient builds its methods from /schema.json, which lists BentoML APIs;
    the endpoints here are routes of a mounted app, so it has no `embed`: only raw requests."""
    schema = httpx.get(server.url + "/schema.json").json()
    assert not [route["name"] for route in schema["routes"]]
    with bentoml.SyncHTTPClient(server.url, token=KEY) as client:
        with pytest.raises(AttributeError):
            _ = client.embed
        files = [("images", ("a.png", png(arrays(1)[0]), "image/png"))]
        assert client.request("POST", "/embed", files=files).status_code == 200


# -- /metrics -----------------------------------------------------------------------------------


def scrape(server) -> dict[tuple, float]:
    """{(sample name, label items without `le`, sorted): value} of /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = sorted((k, v) for k, v in s.labels.items() if k != "le")
            if "le" in s.labels:
                labels.append(("le", s.labels["le"]))
            out[(s.name, *labels)] = s.value
    return out


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, *sorted(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_known_traffic(server):
    before = scrape(server)
    for i in range(3):  # 3 requests of 2 images
        post_embed(server, [png(a) for a in arrays(2, seed=10 + i)])
    refused = httpx.post(
        server.url + "/embed", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert refused.status_code == 415
    after = scrape(server)
    m = {"model": MODEL}
    assert delta(after, before, "embedserve_images_embedded_total", **m) == 6
    calls = delta(after, before, "embedserve_batch_size_count", **m)
    assert 3 <= calls <= 6  # a request's images share a call, or not
    assert delta(after, before, "embedserve_batch_size_sum", **m) == 6
    assert delta(after, before, "embedserve_model_call_seconds_count", **m) == calls
    assert delta(after, before, "embedserve_queue_wait_seconds_count", **m) == 6
    assert delta(after, before, "embedserve_decode_seconds_count", **m) == 3
    assert delta(after, before, "embedserve_decode_seconds_sum", **m) > 0
    reason = {"reason": "unsupported_media_type", "status": "415"}
    assert delta(after, before, "embedserve_requests_refused_total", **m, **reason) == 1
    size = httpx.get(server.url + "/info", headers=AUTH).json()["index"]["size"]
    assert after[("embedserve_index_size", ("model", MODEL))] == size
    # the batch-size buckets are cumulative and end with every call
    top = after[("embedserve_batch_size_bucket", ("model", MODEL), ("le", "+Inf"))]
    assert top == after[("embedserve_batch_size_count", ("model", MODEL))]


def test_metrics_of_two_workers_are_merged_on_one_endpoint(tmp_path):
    """Each worker writes its metrics to BentoML's multiprocess directory; whichever worker
    answers /metrics reports the sum."""
    env = {"EMBEDSERVE_WORKERS": "2", **own_metrics(tmp_path / "bentoml_home")}

    def embed_one(seed: int) -> int:
        files = [("images", ("a.png", png(arrays(1, seed=seed)[0]), "image/png"))]
        return httpx.post(srv.url + "/embed", files=files, timeout=60).status_code

    with running(env, tmp_path / "server.log") as srv:
        before = scrape(srv)
        with ThreadPoolExecutor(8) as pool:  # concurrent connections: both workers take some
            assert set(pool.map(embed_one, range(16))) == {200}
        scrapes = [scrape(srv) for _ in range(4)]  # answered by either worker
        for after in scrapes:
            assert delta(after, before, "embedserve_images_embedded_total", model=MODEL) == 16
            assert delta(after, before, "embedserve_batch_size_sum", model=MODEL) == 16
