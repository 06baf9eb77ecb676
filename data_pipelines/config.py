"""config.data: where the raw data are, the preprocessing, and the input pipeline, with their
defaults (the paper's).

The data layer owns these keys: `python -m data_pipelines.prepare` starts from them, and a
training config (configs/brats18.py) takes them as its `data` field. Every key may be
overridden on a trainer's command line as --config.data.<key>=<value>.
"""

import ml_collections
from ml_collections import config_dict

from data_pipelines.brats import preprocess


def get_data_config() -> ml_collections.ConfigDict:
  """Raw data location, the paper's preprocessing (Section IV) and the input pipeline."""
  d = ml_collections.ConfigDict()
  # Raw NIfTI folder: MSD Task01_BrainTumour or a BraTS challenge training folder.
  d.source_dir = config_dict.placeholder(str)
  # Prepared TFDS data; default: <source_dir>/../prepared when unset.
  d.data_dir = config_dict.placeholder(str)
  # 'auto' | 'msd' | 'brats' (2018-2021 names) | 'brats2023' (2023+ names): how cases are laid out.
  d.layout = "auto"
  # 'msd_task01': download the Decathlon's Task01_BrainTumour instead of reading source_dir
  # (checked against its published size and MD5, resumable, kept in <data_dir>/downloads;
  # data_dir default: TFDS's, ~/tensorflow_datasets). Unset: source_dir, as downloaded by hand.
  d.download = config_dict.placeholder(str)
  d.download_url = config_dict.placeholder(str)  # A mirror; needs download_md5 unless the same.
  d.download_md5 = config_dict.placeholder(str)  # The MD5 the downloaded archive must have.
  # > 0: only the archive's first N cases, by HTTP range requests (into data_dir/<download>_firstN).
  d.download_cases = 0
  # The preprocessing, what a prepared data set holds. Its keys, their defaults (the paper's)
  # and help are the fields of data_pipelines/brats/preprocess.py:Preprocessing, also the
  # flags of `python -m data_pipelines.prepare`; a change of any of them prepares new data:
  #   label_convention      Label values on disk: 'auto' (the one the file names decide), or brats,
  #                         msd, brats2023, gli2024 (adds RC), ped2024 (labels.py).
  #   modalities            Image channels: any subset and order of flair, t1, t1ce, t2 (or their
  #                         2023 names t2f, t1n, t1c, t2w).
  #   slice_start           First axial slice kept (inclusive).
  #   slice_stop            Last axial slice kept (inclusive).
  #   crop_size             Square in-plane crop of the 240x240 slices; larger than a volume, it
  #                         pads it with zeros.
  #   crop_center           (x, y) centre of the crop; unset: the centre of the volume (or of the
  #                         brain).
  #   crop_around           Unset crop_center: centre the crop on the 'volume' (the paper) or on
  #                         the 'brain' (its in-plane bounding box, for volumes not centred like
  #                         BraTS's).
  #   slice_range           Axial slices kept: 'fixed', slice_start..slice_stop (the paper's
  #                         30..120), or 'brain', every slice holding brain (any depth, e.g.
  #                         MNI152's 182).
  #   normalize             'zscore': per modality per volume over brain (non-zero) voxels, 0 stays
  #                         0; or 'none'.
  #   split_seed            Seed of the patient-level train/validation/test split.
  #   num_validation_cases  -1: 30 of 285 (the paper), proportional to the case count; ignored
  #                         with num_folds.
  #   num_test_cases        -1: 30 of 285 (the paper), proportional to the case count.
  #   num_folds             0: the fixed train/validation split (the paper's); K >= 2: K seeded
  #                         patient-level folds of the non-test cases (num_validation_cases is then
  #                         ignored), the test split the same in every fold.
  #   fold                  With num_folds K: the fold whose share is the validation split, 0..K-1;
  #                         train is the other folds' cases.
  #   storage_dtype         Stored images: 'float16' holds z-scores to ~3 significant digits at half
  #                         the bytes of 'float32'.
  #   compression           'none': fastest to read (7.5 GB for 285 cases at float16); 'zlib': ~1/3
  #                         of that on disk for synthetic data, but ~0.5 ms of CPU per slice to
  #                         inflate.
  for field in preprocess.parameters():
    d[field.name] = (config_dict.placeholder(preprocess.value_type(field))
                     if field.default is None else field.default)
  d.augment = False  # Random flips + small intensity scale/shift (off in the paper).
  d.shuffle_buffer = 4096  # Slices held for shuffling within an epoch.
  d.prefetch = 2  # Batches prepared ahead of the train step.
  # > 0: when source_dir is unset, generate this many synthetic BraTS-like cases into
  # <workdir>/synthetic and train on them (the demo); 0: source_dir is required.
  d.synthetic_cases = 0
  d.synthetic_shape = (240, 240, 155)  # Volume shape of generated cases (X, Y, Z).
  d.synthetic_layout = "msd"  # File layout the generator writes: 'msd' | 'brats' | 'brats2023'.
  # Label convention it writes: 'auto' (the layout's own) or, for brats2023, 'gli2024' (adds RC).
  d.synthetic_labels = "auto"
  d.synthetic_geometry = "brats"  # 'brats' (SRI24 LPS) or 'mni152' (the template's RAS affine).
  return d
