"""Make a copy of asv's published site that renders without internet access.

asv's ``index.html`` loads jQuery, flot, bootstrap and friends from public CDNs; on a
machine without internet the page only says "Can not determine continental origin of
swallow".  This copies ``.asv/html`` to DST, fetches the same library versions with
``npm pack`` (the ordinary npm client) into ``DST/vendor`` and points ``index.html`` at them.
``stupidtable`` (table sorting) is not on npm: a no-op stand-in keeps the page working,
only the summary table's click-to-sort is lost.

    python scripts/asv_offline_site.py .asv/html /tmp/asv-site
    python -m http.server 8123 --bind 127.0.0.1 --directory /tmp/asv-site
"""

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: npm package -> {file inside the package tarball: URL fragment in index.html}
ASSETS = {
    "jquery@3.3.1": {"package/dist/jquery.min.js": "jquery-3.3.1.min.js"},
    "flot@0.8.3": {
        "package/jquery.flot.js": "flot/0.8.3/jquery.flot.min.js",
        "package/jquery.flot.time.js": "flot/0.8.3/jquery.flot.time.min.js",
        "package/jquery.flot.selection.js": "flot/0.8.3/jquery.flot.selection.min.js",
        "package/jquery.flot.categories.js": "flot/0.8.3/jquery.flot.categories.min.js",
    },
    "flot-orderbars@1.0.0": {"package/js/jquery.flot.orderBars.js": "jquery.flot.orderBars.js"},
    "blueimp-md5@2.19.0": {"package/js/md5.min.js": "md5.min.js"},
    "bootstrap@3.1.1": {
        "package/dist/js/bootstrap.min.js": "bootstrap.min.js",
        "package/dist/css/bootstrap.min.css": "bootstrap.min.css",
    },
}
STUPIDTABLE_SHIM = "jQuery.fn.stupidtable = function () { return this; };\n"


def main(src, dst):
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    vendor = dst / "vendor"
    vendor.mkdir()
    local = {}  # URL fragment -> local path
    with tempfile.TemporaryDirectory() as tmp:
        for spec, files in ASSETS.items():
            out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(tmp) / out) as tar:
                for member, fragment in files.items():
                    name = Path(fragment).name
                    (vendor / name).write_bytes(tar.extractfile(member).read())
                    local[fragment] = f"vendor/{name}"
    (vendor / "stupidtable.min.js").write_text(STUPIDTABLE_SHIM)
    local["stupidtable.min.js"] = "vendor/stupidtable.min.js"

    index = dst / "index.html"
    html = index.read_text()

    def rewrite(match):
        url = match.group(2)
        for fragment, path in local.items():
            if url.endswith(fragment):
                return f'{match.group(1)}="{path}"'
        return match.group(0)

    html = re.sub(r'(src|href)="(https://[^"]+)"', rewrite, html)
    html = re.sub(r'\s+integrity="[^"]*"', "", html)
    left = re.findall(r'(?:src|href)="(https://[^"]+)"', html)
    index.write_text(html)
    if left:
        print("still remote:", *left, sep="\n  ", file=sys.stderr)
    print(f"wrote {dst} ({len(local)} local assets)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
