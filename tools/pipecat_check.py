"""Speak a paragraph through pipecat's own TTS services pointed at this server, and fail on any
error frame or missing audio.

pipecat pins packages this project pins differently (soxr), so it cannot share .venv; run this
from a virtualenv of its own:

    python3.11 -m venv /tmp/pipecat && /tmp/pipecat/bin/pip install "pipecat-ai[openai,elevenlabs,cartesia]"
    /tmp/pipecat/bin/python tools/pipecat_check.py --url http://127.0.0.1:8000 [--service openai|elevenlabs|cartesia]

Prints the seconds of audio received and the time to its first byte; exits 1 on an error frame.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

PARAGRAPH = (
    "Good afternoon, and thank you for calling the city library. Our opening hours have changed this "
    "month: from Monday to Thursday we are open from nine in the morning until eight in the evening, on "
    "Fridays until six, and on Saturdays from ten until four. The reading room on the second floor is closed "
    "for repairs until the fifteenth, but the children's corner and the computer room are open as usual. If "
    "you would like to renew a book, please have your card number ready, and say renew at any time. To "
    "speak with a librarian, stay on the line, and the next available person will be with you shortly."
)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--service", choices=["openai", "elevenlabs", "cartesia"], default="openai")
    parser.add_argument("--voice", default="alloy")
    parser.add_argument("--text", default=PARAGRAPH)
    args = parser.parse_args()

    from pipecat.frames.frames import EndFrame, ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    ws_url = args.url.replace("http", "ws", 1)
    if args.service == "openai":
        from pipecat.services.openai.tts import OpenAITTSService

        tts = OpenAITTSService(
            api_key="unused", base_url=f"{args.url}/v1", settings=OpenAITTSService.Settings(voice=args.voice)
        )
    elif args.service == "elevenlabs":
        from pipecat.services.elevenlabs.tts import ElevenLabsTTSService

        tts = ElevenLabsTTSService(
            api_key="unused", url=ws_url, settings=ElevenLabsTTSService.Settings(voice=args.voice)
        )
    else:
        from pipecat.services.cartesia.tts import CartesiaTTSService

        tts = CartesiaTTSService(
            api_key="unused", url=f"{ws_url}/tts/websocket", settings=CartesiaTTSService.Settings(voice=args.voice)
        )

    errors: list[str] = []
    received: dict[str, float] = {"bytes": 0, "rate": 24000, "first": 0.0}
    started = time.monotonic()

    class Watch(FrameProcessor):
        """Sees error frames (pushed upstream) before the TTS and audio frames after it."""

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, ErrorFrame):
                errors.append(str(frame.error))
            if isinstance(frame, TTSAudioRawFrame):
                received["bytes"] += len(frame.audio)
                received["rate"] = frame.sample_rate
                received["first"] = received["first"] or time.monotonic() - started
            await self.push_frame(frame, direction)

    worker = PipelineWorker(Pipeline([Watch(), tts, Watch()]))
    await worker.queue_frames([TTSSpeakFrame(args.text), EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    seconds = received["bytes"] / 2 / received["rate"]
    print(f"service={args.service} audio_s={seconds:.1f} first_audio_s={received['first'] or None} errors={errors}")
    return 1 if errors or seconds == 0 else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
