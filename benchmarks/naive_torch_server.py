"""The embedding server a user writes first: the baseline (b) of benchmarks.serve_load.

A plain Starlette app under uvicorn, one worker: PyTorch eager torchvision ResNet-18 (fc replaced
by Identity), each image decoded with PIL and transformed with torchvision transforms, one
forward call per image (8 images in a request are 8 sequential forward calls), no batching, the
model run inline in the async endpoint, torch's default thread count. The weights are randomly
initialised (nothing is downloaded): speed does not depend on them. It answers the same contract
as embedserve's service, so the same load generator drives both:

    POST /embed   multipart/form-data, field `images` repeated -> {"model", "dim", "embeddings"}
    GET  /readyz  200 once the model is loaded;   GET /info  what runs

    python -m benchmarks.naive_torch_server --port 3001 [--size 128] [--device auto]
"""

from __future__ import annotations

import argparse
import io

import torch
import torchvision
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from torchvision import transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics


def build_app(size: int = 128, device: str = "auto") -> Starlette:
    """The app: a random-init ResNet-18 embedding `size` px centre crops on `device`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )

    async def embed(request: Request) -> JSONResponse:
        form = await request.form()
        files = form.getlist("images")
        if not files:
            return JSONResponse({"error": "no file in the form field 'images'"}, status_code=400)
        embeddings = []
        for f in files:
            img = Image.open(io.BytesIO(await f.read())).convert("RGB")
            x = transform(img).unsqueeze(0).to(device)  # 1x3xHxW
            with torch.no_grad():
                z = torch.nn.functional.normalize(model(x), dim=1)  # 1x512
            embeddings.append(z[0].cpu().tolist())
        return JSONResponse({"model": "resnet18-random", "dim": 512, "embeddings": embeddings})

    async def readyz(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "server": "naive: Starlette + uvicorn, PyTorch eager, one image per forward call",
                "provider": f"torch eager {device}",
                "model": "torchvision resnet18, random init, fc=Identity",
                "input": f"{size}x{size}",
                "batching": None,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )

    return Starlette(
        routes=[
            Route("/embed", embed, methods=["POST"]),
            Route("/readyz", readyz),
            Route("/info", info),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3001)
    p.add_argument("--size", type=int, default=128, help="input size in pixels")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    uvicorn.run(build_app(args.size, args.device), host=args.host, port=args.port, workers=1)


if __name__ == "__main__":
    main()
