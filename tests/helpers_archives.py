"""Tiny copies of the four benchmark archives, in exactly their distributed layouts.

Each builder writes a few classes of colour-coded JPEGs (image ``j`` of the ``i``-th class, in
class-id order, is :func:`tests.helpers_images.class_colour` ``(i, j)``) with the archive's own
list files, and returns the folder a user would give as ``data.root``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers_images import class_colour, solid, write_image

SIZE = (12, 12)


def _image(path: Path, class_index: int, image_index: int) -> None:
    write_image(path, solid(SIZE, class_colour(class_index, image_index)), quality=95)


def make_cub(parent: Path, classes: dict[int, int]) -> Path:
    """``parent/CUB_200_2011/`` with ``classes[id]`` images of each class id (1-based, as in
    the archive: ids 1-100 train, 101-200 test)."""
    folder = parent / "CUB_200_2011"
    folder.mkdir(parents=True)
    images, labels, names = [], [], []
    image_id = 0
    for i, class_id in enumerate(sorted(classes)):
        name = f"{class_id:03d}.Bird_{class_id}"
        names.append(f"{class_id} {name}")
        for j in range(classes[class_id]):
            image_id += 1
            relative = f"{name}/Bird_{class_id}_{j:04d}_{image_id}.jpg"
            _image(folder / "images" / relative, i, j)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    # The archive's classification split and boxes: present, and ignored by the protocol.
    (folder / "train_test_split.txt").write_text(
        "\n".join(f"{k + 1} {k % 2}" for k in range(image_id)) + "\n"
    )
    (folder / "bounding_boxes.txt").write_text(
        "\n".join(f"{k + 1} 0.0 0.0 12.0 12.0" for k in range(image_id)) + "\n"
    )
    return folder


def make_cars(folder: Path, classes: dict[int, int]) -> Path:
    """``folder/cars_annos.mat`` (written with scipy.io.savemat in the release's structure) and
    ``folder/car_ims/`` with ``classes[id]`` images of each class id (ids 1-98 train, 99-196
    test). The mat's ``test`` flag alternates, to show that the protocol ignores it."""
    import scipy.io

    folder.mkdir(parents=True)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    rows = []
    for i, class_id in enumerate(sorted(classes)):
        for j in range(classes[class_id]):
            relative = f"car_ims/{len(rows) + 1:06d}.jpg"
            _image(folder / relative, i, j)
            rows.append((relative, class_id, len(rows) % 2))
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, (relative, class_id, test) in enumerate(rows):
        annotations[0, k] = (
            relative,
            np.array([[1]], np.uint8),
            np.array([[2]], np.uint8),
            np.array([[11]], np.uint16),
            np.array([[10]], np.uint16),
            np.array([[class_id]], np.uint8),
            np.array([[test]], np.uint8),
        )
    names = np.empty((1, 196), dtype=object)
    for k in range(196):
        names[0, k] = f"Maker Model {k + 1} 2012"
    scipy.io.savemat(folder / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return folder


def make_sop(parent: Path, train: dict[int, int], test: dict[int, int]) -> Path:
    """``parent/Stanford_Online_Products/`` with Ebay_train.txt and Ebay_test.txt listing
    ``count`` images of each class id (super classes: two folders)."""
    folder = parent / "Stanford_Online_Products"
    folder.mkdir(parents=True)
    header = "image_id class_id super_class_id path\n"
    image_id = 0
    order = {class_id: i for i, class_id in enumerate(sorted({**train, **test}))}
    for name, classes in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = []
        for class_id in sorted(classes):
            super_id = 1 + class_id % 2
            for j in range(classes[class_id]):
                image_id += 1
                relative = f"{['bicycle', 'chair'][super_id - 1]}_final/{class_id}_{j}.JPG"
                _image(folder / relative, order[class_id], j)
                lines.append(f"{image_id} {class_id} {super_id} {relative}")
        (folder / name).write_text(header + "\n".join(lines) + "\n")
    return folder


def make_inshop(folder: Path, items: dict[str, tuple[int, int, int]]) -> Path:
    """``folder/list_eval_partition.txt`` and ``folder/img/``: ``items[id] = (train, query,
    gallery)`` images of each item id. An item is a training item or a test item, not both."""
    folder.mkdir(parents=True)
    rows = []
    for i, item in enumerate(sorted(items)):
        counts = dict(zip(("train", "query", "gallery"), items[item]))
        j = 0
        for status, count in counts.items():
            for _ in range(count):
                relative = f"img/WOMEN/Dresses/{item}/{j:02d}_1_front.jpg"
                _image(folder / relative, i, j)
                rows.append(f"{relative:<60}{item:<15}{status}")
                j += 1
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (folder / "list_eval_partition.txt").write_text(text)
    return folder
