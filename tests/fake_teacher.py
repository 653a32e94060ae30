"""A scripted OpenAI-compatible teacher for the alignment tests: valid answers for every stage's
schema (tasks, examples of the short families, verdicts), a count of every request body it
answered, and an optional request that blocks (so a test can kill its client mid-stage)."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("river stone lamp garden violin harbor pencil meadow engine lantern copper orchard signal canyon "
         "ribbon glacier market compass thunder velvet marble falcon quarry saddle beacon willow ember").split()


def sentence(seed: str, words: int = 9) -> str:
    rng = random.Random(hashlib.sha256(seed.encode()).hexdigest())
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def answer(body: dict) -> tuple[str, str]:
    """(kind, JSON text) for a request, from the schema it asks for."""
    schema = body["response_format"]["json_schema"]["schema"]
    key = json.dumps(body["messages"], sort_keys=True)
    props = schema["properties"]
    if "tasks" in props:
        return "brainstorm", json.dumps({"tasks": [f"Find text that restates a claim about {sentence(key, 3)[:-1]}"]})
    if "best" in props:
        return "verdict", json.dumps({"reason": "candidate 1 follows the request best", "best": 1, "worst": 2})
    return "example", json.dumps({name: sentence(key + name) for name in props})


class FakeTeacher:
    def __init__(self, block_kind: str | None = None, block_at: int = 0):
        self.counts: Counter = Counter()  # request body -> times answered
        self.kinds: Counter = Counter()  # kind -> answered
        self.block_kind, self.block_at = block_kind, block_at
        self.blocked = threading.Event()  # set when the blocking request has arrived
        self.release = threading.Event()
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind, text = answer(body)
                with teacher.lock:
                    arrived = teacher.kinds[kind] + 1
                if kind == teacher.block_kind and arrived == teacher.block_at and not teacher.blocked.is_set():
                    teacher.blocked.set()
                    teacher.release.wait()  # never answered: the client is killed meanwhile
                    return
                with teacher.lock:
                    teacher.kinds[kind] += 1
                    teacher.counts[json.dumps(body, sort_keys=True)] += 1
                reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
