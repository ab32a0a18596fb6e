"""Facts of MNIST and of the models' interface that several floors need, written once.

Ground floor: imports nothing. Every model takes `IMAGE_SHAPE` raw pixels
(0-255) named `INPUT_NAME` and returns `NUM_CLASSES` probabilities named
`OUTPUT_NAME`; exported SavedModels and TFLite files keep those names.
"""

IMAGE_SIZE = 28
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
NUM_CLASSES = 10
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"
