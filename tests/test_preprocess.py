"""The paper's preprocessing: slice range, crop with offsets, z-score, and pasting back."""

import numpy as np
import pytest

from data_pipelines.brats import layouts
from data_pipelines.brats import preprocess


def _phantom(shape=(60, 64, 40), num_modalities=2, seed=0):
  """A brain-like blob (non-zero inside, exactly 0 outside) with labels inside it."""
  rng = np.random.default_rng(seed)
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
  brain = x**2 + y**2 + z**2 < 0.6
  image = np.zeros(shape + (num_modalities,), np.float32)
  for m in range(num_modalities):
    image[..., m][brain] = rng.normal(300 * (m + 1), 40 * (m + 1), brain.sum())
  label = np.zeros(shape, np.uint8)
  label[brain & (x > 0.1)] = 2
  label[brain & (x > 0.3) & (y > 0)] = 3
  label[brain & (x > 0.3) & (y <= 0)] = 1
  return image, label


def test_crop_offsets():
  assert preprocess.crop_offsets((240, 240), 190) == (25, 25)
  assert preprocess.crop_offsets((241, 200), 190) == (25, 5)
  assert preprocess.crop_offsets((240, 240), 240) == (0, 0)
  assert preprocess.crop_offsets((240, 240), 190, center=(100, 130)) == (5, 35)
  # A centre near the border moves the window inward.
  assert preprocess.crop_offsets((240, 240), 190, center=(10, 239)) == (0, 50)
  # Larger than the volume: centred on it, starting before it (padded), centre or not.
  assert preprocess.crop_offsets((182, 218), 190) == (-4, 14)
  assert preprocess.crop_offsets((182, 218), 190, center=(10, 10)) == (-4, 0)
  with pytest.raises(ValueError, match="positive"):
    preprocess.crop_offsets((240, 240), 0)


def test_zscore_over_brain_with_background_zero():
  image, _ = _phantom()
  image[..., 1] *= 0  # A modality with no brain voxels stays 0.
  out = preprocess.zscore(image)
  assert out.dtype == np.float32 and out.shape == image.shape
  brain = image[..., 0] != 0
  assert abs(out[..., 0][brain].mean()) < 1e-4
  assert abs(out[..., 0][brain].std() - 1.0) < 1e-4
  assert np.all(out[..., 0][~brain] == 0)
  assert np.all(out[..., 1] == 0)


def test_zscore_uses_each_modalitys_own_brain():
  image, _ = _phantom(num_modalities=2)
  image[:30, ..., 1] = 0  # Modality 1 covers only part of the brain.
  out = preprocess.zscore(image)
  for m in range(2):
    brain = image[..., m] != 0
    assert abs(out[..., m][brain].mean()) < 1e-4 and abs(out[..., m][brain].std() - 1) < 1e-4
    assert np.all(out[..., m][~brain] == 0)


def test_preprocess_case_shapes_offsets_and_window():
  image, label = _phantom()
  slices = preprocess.preprocess_case(image, label, slice_start=5, slice_stop=30, crop_size=50)
  assert slices.image.shape == (26, 50, 50, 2) and slices.image.dtype == np.float32
  assert slices.label.shape == (26, 50, 50) and slices.label.dtype == np.uint8
  np.testing.assert_array_equal(slices.slice_indices, np.arange(5, 31))
  assert slices.offsets == (5, 7)
  # Statistics come from the whole volume: the same as normalising first, then cutting.
  expected = preprocess.zscore(image)[5:55, 7:57, 5:31].transpose(2, 0, 1, 3)
  np.testing.assert_allclose(slices.image, expected, atol=1e-6)
  np.testing.assert_array_equal(slices.label, label[5:55, 7:57, 5:31].transpose(2, 0, 1))
  # Slice s is the axial plane volume[:, :, slice_indices[s]].
  np.testing.assert_array_equal(slices.label[3], label[5:55, 7:57, 8])


def test_preprocess_case_paper_defaults():
  image = np.zeros((240, 240, 155, 1), np.float32)
  image[60:180, 50:190, 10:140, 0] = 1.0 + np.arange(130, dtype=np.float32)
  slices = preprocess.preprocess_case(image)
  assert slices.image.shape == (91, 190, 190, 1)
  assert slices.label is None
  assert (slices.slice_indices[0], slices.slice_indices[-1]) == (30, 120)
  assert slices.offsets == (25, 25)


def test_preprocess_case_without_normalisation_and_with_centre():
  image, label = _phantom()
  slices = preprocess.preprocess_case(image, label, slice_start=0, slice_stop=None,
                                      crop_size=40, crop_center=(20, 40), normalize="none")
  assert slices.offsets == (0, 20)
  assert slices.image.shape == (40, 40, 40, 2)
  np.testing.assert_array_equal(slices.image, image[0:40, 20:60].transpose(2, 0, 1, 3))


def test_slice_range_is_clipped_or_refused():
  image, _ = _phantom()
  clipped = preprocess.preprocess_case(image, slice_start=30, slice_stop=120, crop_size=40)
  np.testing.assert_array_equal(clipped.slice_indices, np.arange(30, 40))
  with pytest.raises(ValueError, match="outside the volume"):
    preprocess.preprocess_case(image, slice_start=50, slice_stop=120, crop_size=40)
  with pytest.raises(ValueError, match="after slice_stop"):
    preprocess.preprocess_case(image, slice_start=20, slice_stop=10, crop_size=40)
  with pytest.raises(ValueError, match="normalize"):
    preprocess.preprocess_case(image, crop_size=40, normalize="minmax")
  with pytest.raises(ValueError, match="Label shape"):
    preprocess.preprocess_case(image, np.zeros((2, 2, 2), np.uint8), crop_size=40)


def test_paste_back_is_the_inverse():
  image, label = _phantom()
  slices = preprocess.preprocess_case(image, label, slice_start=3, slice_stop=36, crop_size=50)
  pasted = preprocess.paste_back(slices.label, slices.slice_indices, slices.offsets, label.shape)
  assert pasted.dtype == np.uint8 and pasted.shape == label.shape
  # The phantom's labels all lie in the window, so pasting back restores them exactly.
  np.testing.assert_array_equal(pasted, label)
  # Outside the window everything is 0, whatever the slices held.
  ones = preprocess.paste_back(np.ones_like(slices.label), slices.slice_indices,
                               slices.offsets, label.shape)
  assert ones.sum() == slices.label.size
  assert ones[:5].sum() == 0 and ones[:, :, :3].sum() == 0 and ones[:, :, 37:].sum() == 0


def test_paste_back_refuses_mismatches():
  labels = np.zeros((4, 10, 10), np.uint8)
  with pytest.raises(ValueError, match="4 slices but 3"):
    preprocess.paste_back(labels, [1, 2, 3], (0, 0), (20, 20, 20))
  with pytest.raises(ValueError, match="misses the 20x20 volume"):
    preprocess.paste_back(labels, [1, 2, 3, 4], (25, 0), (20, 20, 20))
  with pytest.raises(ValueError, match="outside the volume"):
    preprocess.paste_back(labels, [1, 2, 3, 20], (0, 0), (20, 20, 20))


def test_brain_slice_range():
  image = np.zeros((8, 8, 20, 2), np.float32)
  image[2, 3, 4, 1] = 5
  image[5, 5, 13, 0] = -1
  assert preprocess.brain_slice_range(image) == (4, 13)
  assert preprocess.brain_slice_range(image[..., 0]) == (13, 13)
  with pytest.raises(ValueError, match="no non-zero"):
    preprocess.brain_slice_range(np.zeros((4, 4, 4)))


def test_synthetic_case_through_reader_and_preprocessing(synthetic_brats, synthetic_shape):
  case = layouts.load_case(layouts.find_cases(synthetic_brats)[0])
  start, stop = preprocess.brain_slice_range(case.image)
  slices = preprocess.preprocess_case(case.image, case.label, slice_start=start,
                                      slice_stop=stop, crop_size=40)
  # Every tumour voxel survives the crop, and pasting back gives the label volume.
  assert np.count_nonzero(slices.label) == np.count_nonzero(case.label)
  np.testing.assert_array_equal(
      preprocess.paste_back(slices.label, slices.slice_indices, slices.offsets,
                            synthetic_shape), case.label)
  brain = slices.image != 0
  assert abs(slices.image[brain].mean()) < 0.2


def test_a_crop_larger_than_the_volume_pads_and_pastes_back_exactly():
  # MNI152-like: narrower than the crop along x, wider along y; brain off-centre.
  rng = np.random.default_rng(0)
  image = np.zeros((18, 30, 12, 2), np.float32)
  image[2:12, 10:28, 3:9] = rng.uniform(1, 2, (10, 18, 6, 2))
  label = np.zeros((18, 30, 12), np.uint8)
  label[4:8, 20:26, 4:7] = 3
  slices = preprocess.preprocess_case(image, label, crop_size=20, slice_range="brain",
                                      crop_around="brain")
  np.testing.assert_array_equal(slices.slice_indices, np.arange(3, 9))
  # x: padded (20 > 18), centred on the volume; y: around the brain's box centre (10..27 -> 19).
  assert slices.offsets == (-1, 9)
  assert slices.image.shape == (6, 20, 20, 2) and not slices.image[:, 0].any()
  pasted = preprocess.paste_back(slices.label, slices.slice_indices, slices.offsets, label.shape)
  np.testing.assert_array_equal(pasted, label)
  centred = preprocess.preprocess_case(image, label, crop_size=20, slice_start=0, slice_stop=11)
  assert centred.offsets == (-1, 5)
