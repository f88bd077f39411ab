"""
A loopback OpenAI-compatible chat-completions server standing in for an MLLM grader (reward.MLLMGrader):
test_all.py checks the grader against it, dev/bench.py measures the grader's concurrency with it.
What it answers depends on the first word of the prompt in the rubric (and on the URL path):

    good / free / garbage / flaky / slow / vary   a rubric JSON, free text, no score, two 500s then a score,
                                                  1 s late, a score from the image's brightness
    conc / lat50                                  held until conc_hold (4) are in flight, at most 2 s / 50 ms late
                                                  (concurrency and throughput)
    /half/...   toy captions: a score from the image, or (about half of the captions) no score
    /flaky/...  a third of the first answers fail (500 or garbage)
    anything else: {"overall": 5}

    stub = StubGrader(); grader = reward.MLLMGrader(stub.url, ...); ...; stub.server.shutdown()
"""
import time
from collections import Counter

import numpy as np


def image_score(data_url):
    """1..10 from the image's mean brightness in steps of 1e-3: different images score differently, while
    float noise in an image (a pixel that rounds the other way) almost never changes its score."""
    import base64
    import io
    from PIL import Image
    png = base64.b64decode(data_url.split(",", 1)[1])
    return 1 + int(np.asarray(Image.open(io.BytesIO(png))).mean() / 255 * 1000) % 10


class StubGrader:
    """A loopback OpenAI-compatible server; what it answers depends on the prompt in the rubric."""

    def __init__(self):
        import http.server
        import threading
        stub = self
        self.calls, self.inflight, self.max_inflight, self.auth = Counter(), Counter(), Counter(), set()
        self.conc_hold = 4  # 'conc' requests wait until this many are in flight
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            counted = None  # the kind this request is in flight as, until it leaves

            def log_message(self, *a):
                pass

            def leave(self):  # out of flight, once: before the answer's first byte, since a client that has read an
                with stub.lock:  # answer may send its next request before this thread would reach a `finally`
                    if self.counted is not None:
                        stub.inflight[self.counted] -= 1
                        self.counted = None

            def send_response(self, *args, **kwargs):  # every answer, send_error's too, leaves flight first
                self.leave()
                super().send_response(*args, **kwargs)

            def do_POST(self):
                import json
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][0]["content"][0]["text"]
                assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
                prompt = text.split('prompt: "')[1].split('"')[0]
                kind = prompt.split()[0]
                with stub.lock:  # requests in flight, per kind of prompt: a late retry of another kind
                    stub.calls[prompt] += 1  # never counts towards the concurrency of 'conc' prompts
                    stub.inflight[kind] += 1
                    stub.max_inflight[kind] = max(stub.max_inflight[kind], stub.inflight[kind])
                    stub.auth.add(self.headers.get("Authorization"))
                    n = stub.calls[prompt]
                    self.counted = kind
                try:
                    if self.path.startswith("/half/"):  # toy captions: a score from the image, or (about half
                        kind = "garbage" if len(prompt) % 2 else "vary"  # of the captions) no score at all
                    if self.path.startswith("/flaky/") and n % 3 == 1:  # a third of the first answers fail
                        kind = ("garbage", "500")[len(prompt) % 2]
                        if kind == "500":
                            return self.send_error(500)
                    if kind == "conc":  # held until conc_hold are in flight at once (at most 2 s): on a busy machine
                        t0 = time.time()  # too, a client that allows that many has them in flight together
                        while stub.max_inflight["conc"] < stub.conc_hold and time.time() - t0 < 2:
                            time.sleep(0.005)
                    if kind in ("slow", "conc", "lat50"):  # lat50: bench.py's throughput stub
                        time.sleep({"slow": 1.0, "conc": 0.05, "lat50": 0.05}[kind])
                    if kind == "flaky" and n <= 2:
                        return self.send_error(500)
                    answer = {"good": '```json\n{"prompt_fidelity": 9, "creativity": 7, "visual_quality": 8, '
                                      '"consistency": 8, "emotional_resonance": 8, "overall": 8}\n```',
                              "free": "Overall I would give this image 7/10.", "garbage": "lorem ipsum",
                              "flaky": '{"overall": 6}', "slow": '{"overall": 9}',
                              "vary": '{"overall": %d}' % image_score(body["messages"][0]["content"][1]["image_url"]["url"]),
                              }.get(kind, '{"overall": 5}')  # any other prompt: the same score for every image
                    data = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first
                finally:
                    self.leave()  # no answer sent (an error of the stub's own): out of flight all the same

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
