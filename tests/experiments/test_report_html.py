"""experiments.compare's HTML page: self-contained (images as data URIs) and inline markdown rendered."""

from __future__ import annotations

import base64
import logging

from experiments.compare import inline_html, markdown_to_html, plain_text

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


def test_images_are_embedded_and_inline_code_is_rendered(tmp_path):
    (tmp_path / "plot.png").write_bytes(PNG)
    md = "\n".join(
        [
            "# Report `v1`",
            "**tiny: agent vs `eplb`: a *tie*.**",
            "![plot](plot.png)",
            "| policy | note |",
            "|---|---|",
            "| `coel` | a < b |",
            '- `abc123`: `{"a": 1}`',
        ]
    )
    page = markdown_to_html(md, "t", tmp_path)
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page
    assert "plot.png" not in page.replace('alt="plot"', "")
    assert "<h1>Report <code>v1</code></h1>" in page
    assert "<p><b>tiny: agent vs <code>eplb</code>: a <i>tie</i>.</b></p>" in page
    assert "<td><code>coel</code></td><td>a &lt; b</td>" in page
    assert "<li><code>abc123</code>: <code>{&quot;a&quot;: 1}</code></li>" in page
    assert "`" not in page and "**" not in page


def test_code_spans_are_left_alone_and_plain_text_drops_markup():
    assert inline_html("`a*b*` and 2*3*4 x * y") == "<code>a*b*</code> and 2*3*4 x * y"
    assert plain_text("**tiny: `eplb` wins.**") == "tiny: eplb wins."


def test_a_missing_image_is_one_warning_and_stays_a_link(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="experiments.compare"):
        page = markdown_to_html("![gone](gone.png)", "t", tmp_path)
    assert 'src="gone.png"' in page
    assert [r.getMessage() for r in caplog.records] == ["report.html: image 'gone.png' not found; left as a link"]
