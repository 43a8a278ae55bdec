"""Decode a video into the frames a model's processor takes, with PyAV (FFmpeg's decoders).

Frames are sampled here, before the processor, at ``data.video_fps`` frames per second of video
time and at most ``data.video_max_frames`` (spread evenly over the whole video when there are more):
the number of frames, and so the sample's video tokens, is then fixed by the config and counted in
the token budget like any other tokens. The processor is told not to sample again.

    frames = decode_video(open("clip.mp4", "rb").read(), fps=2.0, max_frames=32)  # (T, H, W, 3) uint8
"""

from __future__ import annotations

import io

import numpy as np

from omni_ray.data.errors import DataError


def sample_times(duration: float, fps: float, max_frames: int) -> np.ndarray:
    """Timestamps (seconds) to keep: one every 1/fps, thinned evenly to at most ``max_frames``."""
    times = np.arange(0.0, max(duration, 0.0), 1.0 / fps) if duration > 0 else np.zeros(1)
    if len(times) > max_frames:
        times = times[np.linspace(0, len(times) - 1, max_frames).round().astype(int)]
    return times


def _read_frames(data: bytes) -> tuple[list[np.ndarray], list[float]]:
    import av

    frames, stamps = [], []
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise DataError("corrupt_video", "the file has no video stream")
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            stamps.append(float(frame.time) if frame.time is not None else len(stamps) / float(stream.average_rate or 1))
    return frames, stamps


def decode_video(data: bytes, *, fps: float, max_frames: int) -> np.ndarray:
    """Frames of the video in ``data`` as an array (T, H, W, 3) of uint8 RGB; T <= max_frames."""
    import av

    try:
        frames, stamps = _read_frames(data)
    except av.FFmpegError as err:
        raise DataError("corrupt_video", f"cannot decode the video: {err}") from err
    if not frames:
        raise DataError("corrupt_video", "the video has no frames")
    stamps = np.asarray(stamps)
    wanted = sample_times(stamps[-1] - stamps[0] + 1e-9, fps, max_frames) + stamps[0]
    # The decoded frame nearest each wanted time; a short clip may repeat none.
    picks = sorted({int(np.abs(stamps - t).argmin()) for t in wanted})
    return np.stack([frames[i] for i in picks])


def encode_test_video(path: str, frames: np.ndarray, fps: int = 4) -> None:
    """Write ``frames`` (T, H, W, 3 uint8) as an MPEG-4 file: tiny videos for tests and demos."""
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


def load_video(ref: str, storage=None, **limits) -> bytes:
    """The raw bytes of the video at ``ref``, read with the image reader's safety limits
    (``max_bytes``, ``timeout_s``, regular files only); an absent file is ``missing_video``."""
    from omni_ray.data.images import load_image

    try:
        return load_image(ref, storage, **limits)
    except DataError as err:
        if err.reason == "missing_image":
            raise DataError("missing_video", f"no video at {ref}") from err
        raise
