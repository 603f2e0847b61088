#!/usr/bin/env python3
"""nnU-Net's side of the nnU-Net ingest test (tests/ingest_nnunet.rs); needs nnunetv2 installed.

    python nnunet_fixture.py raw PHANTOM_DIR OUT_DIR
        A two-channel MR-like dataset in nnU-Net's raw layout made from the phantom that
        `patchflow phantom` wrote (imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz): channel 0
        ("T1") and channel 1 ("T2") are 0 in the air around the body, so nnU-Net crops to the
        body and, the crop shrinking the images below 3/4 of their size, normalises with
        use_mask_for_norm (seg -1 outside the mask).

    python nnunet_fixture.py reference CONFIG_DIR OUT_DIR [CROPS_JSON]
        Loads every case of a preprocessed configuration folder with nnU-Net's own dataset class
        (the one nnU-Net's trainer uses for that folder) and writes, per case, CASE.data (float32
        [C, Z, Y, X], little-endian), CASE.seg (int16 [1, Z, Y, X]) and CASE.json (shape,
        class_locations). With CROPS_JSON (a list of {"case", "origin" [z,y,x], "size" [z,y,x]}),
        also crops.data and crops.seg: every crop cut by nnU-Net's data loader function
        (acvl_utils crop_and_pad_nd, pad 0 for data, -1 for seg), concatenated in list order.
"""

import json
import os
import sys

import numpy as np


def make_raw(phantom, out):
    import nibabel as nib

    with open(os.path.join(phantom, "dataset.json")) as f:
        src = json.load(f)
    os.makedirs(os.path.join(out, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out, "labelsTr"), exist_ok=True)
    cases = sorted(
        n[: -len("_0000.nii.gz")]
        for n in os.listdir(os.path.join(phantom, "imagesTr"))
        if n.endswith("_0000.nii.gz")
    )
    for case in cases:
        ct_img = nib.load(os.path.join(phantom, "imagesTr", f"{case}_0000.nii.gz"))
        ct = np.asanyarray(ct_img.dataobj).astype(np.float32)
        lab_img = nib.load(os.path.join(phantom, "labelsTr", f"{case}.nii.gz"))
        lab = np.asanyarray(lab_img.dataobj).astype(np.uint8)
        body = ct > -500
        t1 = np.where(body, ct + 1000.0, 0.0).astype(np.float32)
        t2 = np.where(body, 300.0 + 40.0 * lab + 0.25 * (ct + 1000.0), 0.0).astype(np.float32)
        for ch, arr in enumerate((t1, t2)):
            img = nib.Nifti1Image(arr, ct_img.affine)
            img.set_qform(ct_img.affine, code=1)
            img.set_sform(ct_img.affine, code=1)
            nib.save(img, os.path.join(out, "imagesTr", f"{case}_{ch:04d}.nii.gz"))
        seg = nib.Nifti1Image(lab, lab_img.affine)
        seg.set_qform(lab_img.affine, code=1)
        seg.set_sform(lab_img.affine, code=1)
        nib.save(seg, os.path.join(out, "labelsTr", f"{case}.nii.gz"))
    dataset = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": src["labels"],
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": "PhantomMR",
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(dataset, f, indent=2)
    print(f"nnunet_fixture: {len(cases)} cases -> {out}")


def reference(config_dir, out, crops_json=None):
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    os.makedirs(out, exist_ok=True)
    dataset_class = infer_dataset_class(config_dir)
    ds = dataset_class(config_dir)
    loaded = {}
    for case in ds.identifiers:
        data, seg, _, props = ds.load_case(case)
        loaded[case] = (data, seg)
        data_np = np.asarray(data[...], dtype=np.float32)
        seg_np = np.asarray(seg[...], dtype=np.int16)
        data_np.astype("<f4").tofile(os.path.join(out, f"{case}.data"))
        seg_np.astype("<i2").tofile(os.path.join(out, f"{case}.seg"))
        locs = {
            str(int(k)): np.asarray(v).astype(np.int64).tolist()
            for k, v in props["class_locations"].items()
        }
        meta = {
            "class": dataset_class.__name__,
            "shape": list(data_np.shape),
            "seg_shape": list(seg_np.shape),
            "class_locations": locs,
            "spacing": [float(s) for s in props["spacing"]],
        }
        with open(os.path.join(out, f"{case}.json"), "w") as f:
            json.dump(meta, f)
    if crops_json:
        with open(crops_json) as f:
            crops = json.load(f)
        with open(os.path.join(out, "crops.data"), "wb") as fd, open(
            os.path.join(out, "crops.seg"), "wb"
        ) as fs:
            for c in crops:
                data, seg = loaded[c["case"]]
                bbox = [[o, o + s] for o, s in zip(c["origin"], c["size"])]
                crop_and_pad_nd(data, bbox, 0).astype("<f4").tofile(fd)
                crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16).astype("<i2").tofile(fs)
    print(f"nnunet_fixture: {len(ds.identifiers)} cases ({dataset_class.__name__}) -> {out}")


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "raw":
        make_raw(sys.argv[2], sys.argv[3])
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) == 5 else None)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
