"""Ask a running aiplatform for recommendations (start it with `make run` first).

    python examples/recommend.py u000001 --k 5
"""

import argparse

import httpx

parser = argparse.ArgumentParser()
parser.add_argument("user_id")
parser.add_argument("--k", type=int, default=10)
parser.add_argument("--url", default="http://127.0.0.1:8000")
args = parser.parse_args()

resp = httpx.post(f"{args.url}/v1/recommendations", json={"user_id": args.user_id, "k": args.k})
resp.raise_for_status()
body = resp.json()
print(f"model {body['model']['name']} v{body['model']['version']} ({body['variant']})"
      + (f", fallback: {body['fallback']}" if body.get("fallback") else ""))
for rank, item in enumerate(body["items"], 1):
    similar = httpx.get(f"{args.url}/v1/items/{item['item_id']}/similar", params={"k": 3}).json()
    print(f"{rank:2d}. {item['item_id']}  score {item['score']:.3f}  "
          f"similar: {', '.join(i['item_id'] for i in similar['items'])}")
