"""Preprocessing users' images the MNIST way, classifying them, and predict.py's bad-input handling (fast)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_keras.cli import predict_main
from mnist_keras.evaluation import predict
from mnist_keras.export import runtimes


def canvas(size=(120, 100), background=255, ink=0, box=(20, 30, 50, 90), mode="L"):
    """A 'digit': a thick ellipse outline (a zero) drawn in `box` (left, top, right, bottom)."""
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).ellipse(box, outline=ink, width=6)
    return image


def centre_of_mass(array):
    total = array.sum()
    rows, cols = np.indices(array.shape)
    return (rows * array).sum() / total, (cols * array).sum() / total


def ink_box(array, threshold=1.0):
    rows, cols = np.flatnonzero((array >= threshold).any(1)), np.flatnonzero((array >= threshold).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_output_is_28x28_float_white_on_black():
    out = predict.preprocess_image(canvas())
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == pytest.approx(255.0, abs=1.0)
    assert out[0].sum() == 0 and out[:, 0].sum() == 0  # background is black


@pytest.mark.parametrize("box", [(5, 5, 35, 65), (70, 30, 110, 95), (40, 2, 60, 40)])
def test_off_centre_digit_is_centred_by_centre_of_mass(box):
    out = predict.preprocess_image(canvas(box=box))
    row, col = centre_of_mass(out)
    assert abs(row - 14.0) <= 0.501 and abs(col - 14.0) <= 0.501  # whole-pixel shifts
    assert max(ink_box(out)) in (20, 21)  # 20 plus at most one pixel of anti-aliasing


def test_centring_uses_centre_of_mass_not_the_box():
    # A heavy blob at the top of a thin line: the box centre and the centre of mass differ.
    image = Image.new("L", (100, 100), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle((45, 10, 55, 20), fill=0)
    draw.line((50, 20, 50, 90), fill=0, width=2)
    out = predict.preprocess_image(image)
    row, _ = centre_of_mass(out)
    assert abs(row - 14.0) <= 0.501
    rows = np.flatnonzero(out.any(1))
    assert (rows[0] + rows[-1]) / 2 > 14.5  # the box is pushed down to bring the mass to the centre


def test_light_and_dark_backgrounds_give_the_same_image():
    dark_on_light = predict.preprocess_image(canvas(background=255, ink=0))
    light_on_dark = predict.preprocess_image(canvas(background=0, ink=255))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1.0)


def test_grey_paper_and_grey_ink_are_stretched():
    out = predict.preprocess_image(canvas(background=200, ink=90))
    reference = predict.preprocess_image(canvas(background=255, ink=0))
    np.testing.assert_allclose(out, reference, atol=2.0)


@pytest.mark.parametrize("box", [(40, 10, 60, 90), (10, 40, 110, 60)])
def test_aspect_ratio_is_kept(box):
    image = Image.new("L", (120, 100), 255)
    ImageDraw.Draw(image).rectangle(box, fill=0)  # (right - left + 1) x (bottom - top + 1) pixels
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    out_height, out_width = ink_box(predict.preprocess_image(image), threshold=128)
    assert max(out_height, out_width) == 20
    assert abs(min(out_height, out_width) - 20 * min(width, height) / max(width, height)) <= 1.0


def test_rgba_with_transparent_background_is_composited_onto_white():
    reference = predict.preprocess_image(canvas())
    rgba = Image.new("RGBA", (120, 100), (0, 0, 0, 0))  # transparent *black*: must not read as ink
    ImageDraw.Draw(rgba).ellipse((20, 30, 50, 90), outline=(0, 0, 0, 255), width=6)
    np.testing.assert_allclose(predict.preprocess_image(rgba), reference, atol=1.0)
    np.testing.assert_allclose(predict.preprocess_image(np.asarray(rgba)), reference, atol=1.0)


def test_array_inputs_rgb_uint8_and_float():
    reference = predict.preprocess_image(canvas())
    gray = np.asarray(canvas())
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_allclose(predict.preprocess_image(rgb), reference, atol=1.0)
    np.testing.assert_allclose(predict.preprocess_image(gray.astype(np.float32) / 255.0), reference, atol=1.0)


@pytest.mark.parametrize("image", [
    Image.new("L", (50, 50), 255), Image.new("L", (50, 50), 0), Image.new("RGB", (40, 30), (128, 128, 128)),
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)), np.zeros((0, 0), np.uint8),
    np.full((30, 30), 240, np.uint8) - np.eye(30, dtype=np.uint8) * 10,  # contrast too faint to be ink
])
def test_blank_images_raise_one_line(image):
    with pytest.raises(ValueError, match="blank image") as error:
        predict.preprocess_image(image)
    assert "\n" not in str(error.value)


def test_bad_array_shape_raises():
    with pytest.raises(ValueError, match="image array must be"):
        predict.preprocess_image(np.zeros((4, 4, 4, 4)))


def test_load_image_errors_name_the_file(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        predict.load_image(not_image)
    truncated = tmp_path / "cut.png"
    canvas().save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        predict.load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        predict.load_image(tmp_path / "missing.png")


class FixedModel:
    """Stands in for a LoadedModel: probabilities favouring digit (N mod 10) for the N-th image."""

    def predict(self, images):
        probabilities = np.full((len(images), 10), 0.01, np.float32)
        for index in range(len(images)):
            probabilities[index, index % 10] = 0.82
            probabilities[index, (index + 1) % 10] = 0.10
        return probabilities


def test_classify_top_k():
    images = [np.zeros((28, 28), np.float32)] * 3
    results = predict.classify(FixedModel(), images, top_k=2)
    assert [[digit for digit, _ in row] for row in results] == [[0, 1], [1, 2], [2, 3]]
    assert results[0][0][1] == pytest.approx(0.82)
    assert predict.classify(FixedModel(), [], top_k=1) == []
    with pytest.raises(ValueError, match="top_k"):
        predict.classify(FixedModel(), images, top_k=0)


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    canvas().save(folder / "a_good.png")
    canvas(background=0, ink=255).convert("RGB").save(folder / "b_good.jpg", quality=95)
    canvas().save(folder / "c_good.bmp")
    Image.new("L", (40, 40), 255).save(folder / "d_blank.png")
    (folder / "e_text.png").write_text("hello")
    (folder / "readme.txt").write_text("not an image suffix: skipped")
    return folder


def test_predict_files_reports_bad_files_and_classifies_the_rest(image_folder):
    results = predict.predict_files(FixedModel(), [image_folder, image_folder / "missing.png"], top_k=3)
    by_name = {result.path.name: result for result in results}
    assert sorted(by_name) == ["a_good.png", "b_good.jpg", "c_good.bmp", "d_blank.png", "e_text.png", "missing.png"]
    assert all(by_name[name].ok and len(by_name[name].top) == 3 for name in ("a_good.png", "b_good.jpg", "c_good.bmp"))
    assert "blank image" in by_name["d_blank.png"].error and "d_blank.png" in by_name["d_blank.png"].error
    assert "e_text.png: not a readable image" in by_name["e_text.png"].error
    assert "missing.png: no such file" in by_name["missing.png"].error


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (result,) = predict.predict_files(FixedModel(), [tmp_path / "empty"])
    assert not result.ok and "no PNG/JPEG/BMP" in result.error


# -- the command line (in-process: no TensorFlow start-up per call) ---------------------------


@pytest.fixture(scope="module")
def untrained_model_file(tmp_path_factory):
    from mnist_keras.models import builders

    path = tmp_path_factory.mktemp("model") / "model.keras"
    builders.build_model("mlp_small").save(path)
    return path


def test_cli_mixed_files_exit_1_one_line_per_bad_file(image_folder, untrained_model_file, capsys):
    status = predict_main([str(image_folder), "--model", str(untrained_model_file), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert status == 1
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 2 and "d_blank.png" in errors[0] and "e_text.png" in errors[1]
    assert "Traceback" not in err
    printed = out.strip().splitlines()
    assert len(printed) == 3 and printed[0].startswith(str(image_folder / "a_good.png"))
    assert printed[0].count("%") == 2


def test_cli_json_and_success_exit_0(image_folder, untrained_model_file, capsys):
    status = predict_main([str(image_folder / "a_good.png"), str(image_folder / "c_good.bmp"),
                           "--model", str(untrained_model_file), "--json"])
    out, _ = capsys.readouterr()
    assert status == 0
    records = json.loads(out)
    assert [Path(r["path"]).name for r in records] == ["a_good.png", "c_good.bmp"]
    # What the model itself says of each preprocessed image (not merely a digit and a probability).
    model = runtimes.load_model(untrained_model_file)
    for record in records:
        probabilities = model.predict(predict.preprocess_image(predict.load_image(record["path"]))[None])[0]
        assert record["digit"] == int(probabilities.argmax()), record
        assert record["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6), record
        assert record["top"] == [{"digit": record["digit"], "probability": record["probability"]}], record


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "MISSING.keras"], "MISSING.keras: no such model"),
    (["--model", "{image}"], "not a model"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "11"], "--top-k must be <= 10"),
])
def test_cli_bad_flags_and_missing_model_exit_2(argv, fragment, image_folder, untrained_model_file, capsys):
    image = str(image_folder / "a_good.png")
    argv = [a.replace("{image}", image) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(untrained_model_file)]
    assert predict_main([image, *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], err


def test_cli_no_images_is_a_usage_error(capsys):
    assert predict_main([]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "the following arguments are required: IMAGE" in lines[0]


# -- photos as people take them -----------------------------------------------------------------------


def upright_digit(size=(600, 800)) -> Image.Image:
    """A dark, asymmetric '7' on white paper: any rotation or mirror changes its model input."""
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.line([(width * 0.2, height * 0.2), (width * 0.8, height * 0.2), (width * 0.4, height * 0.85)],
              fill=0, width=width // 12)
    return image


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_a_photo_with_exif_orientation_6_classifies_like_the_upright_original(tmp_path, untrained_model_file):
    from mnist_keras.export import runtimes

    upright = upright_digit()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the camera was held on its side
    path = tmp_path / "phone.jpg"
    upright.transpose(Image.Transpose.ROTATE_90).convert("RGB").save(path, quality=92, exif=exif)
    expected = predict.preprocess_image(upright)
    seen = predict.preprocess_image(predict.load_image(path))
    assert correlation(seen, expected) > 0.95
    assert correlation(predict.preprocess_image(Image.open(path)), expected) < 0.5  # the file as stored
    model = runtimes.load_model(untrained_model_file)
    np.testing.assert_allclose(model.predict(seen[None]), model.predict(expected[None]), atol=0.02)


def test_a_16_bit_3000x3000_scan_classifies_like_the_8_bit_original(tmp_path, untrained_model_file):
    from mnist_keras.export import runtimes

    original = upright_digit((3000, 3000))
    path = tmp_path / "scan16.png"
    Image.fromarray(np.asarray(original, np.uint16) * 257).save(path)
    assert Image.open(path).mode.startswith("I;16")
    expected = predict.preprocess_image(original)
    seen = predict.preprocess_image(predict.load_image(path))
    assert correlation(seen, expected) > 0.99
    # The web app's decoder (the same one, shrinking on the way in) takes it too.
    from mnist_keras.serving import classifier

    served = predict.preprocess_image(classifier.decode_image(path.read_bytes(), 2_000_000))
    assert correlation(served, expected) > 0.99
    model = runtimes.load_model(untrained_model_file)
    np.testing.assert_allclose(model.predict(seen[None]), model.predict(expected[None]), atol=0.02)


def test_an_eps_file_named_png_is_refused_in_one_line(tmp_path, untrained_model_file, capsys, monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("the EPS decoder was reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    path = tmp_path / "digit.png"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n"
                    "newpath 14 4 moveto 14 24 lineto stroke\nshowpage\n%%EOF\n")
    status = predict_main([str(path), "--model", str(untrained_model_file)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip()]
    assert status == 1 and len(errors) == 1, err
    assert "digit.png" in errors[0] and "not a readable image" in errors[0] and "PNG, JPEG" in errors[0]


def test_file_names_with_escapes_and_newlines_are_printed_escaped(tmp_path, untrained_model_file, capsys):
    good = tmp_path / "seven\x1b[2J\x1b[31mred\nline.png"
    upright_digit((60, 80)).save(good, format="PNG")
    bad = tmp_path / "bad\x1b]0;title\x07\r.png"
    bad.write_bytes(b"not an image")
    status = predict_main([str(good), str(bad), "--model", str(untrained_model_file)])
    out, err = capsys.readouterr()
    assert status == 1
    assert "\x1b" not in out + err and "\x07" not in out + err and "\r" not in out + err
    (printed,) = out.strip().splitlines()
    assert printed.startswith(str(tmp_path / "seven\\x1b[2J\\x1b[31mred\\nline.png") + ": ")
    (error,) = [line for line in err.splitlines() if "error:" in line]
    assert "bad\\x1b]0;title\\x07\\r.png" in error
