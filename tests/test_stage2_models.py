import pytest
import torch

from models.classifier import ClassifierConfig, RegularityClassifier, class_weights
from models.deep_sad import DeepSAD, DeepSADAutoencoder, deep_sad_loss


def test_deep_sad_loss_on_hand_made_embeddings():
    c = torch.zeros(2)
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # squared distances 25, 1, 4
    semi = torch.tensor([0, 1, -1])  # unlabeled, labeled normal, labeled anomaly
    expected = (25 + 2.0 * (1 + 1e-6) + 2.0 / (4 + 1e-6)) / 3
    assert deep_sad_loss(emb, c, semi, eta=2.0).item() == pytest.approx(expected)
    # No labels at all: Deep SVDD, the mean squared distance.
    assert deep_sad_loss(emb, c, torch.zeros(3, dtype=torch.long)).item() == pytest.approx(10.0)


def test_center_coordinates_near_zero_are_pushed_to_plus_minus_eps():
    net = DeepSAD(rep_dim=4)
    c = net.set_center(torch.tensor([[0.05, -0.05, 0.5, -0.3], [0.03, -0.01, 0.7, -0.5]]))
    assert c.tolist() == pytest.approx([0.1, -0.1, 0.6, -0.4])
    assert torch.equal(net.state_dict()["c"], c)  # saved with the weights


def test_every_pretrained_encoder_weight_reaches_the_deep_sad_network():
    torch.manual_seed(0)
    ae, net = DeepSADAutoencoder(), DeepSAD()
    ae(torch.rand(4, 3, 32, 32))  # move BatchNorm running statistics off their defaults
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    net.load_pretrained_encoder(ae)
    src = ae.encoder.state_dict()
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert any(not torch.equal(before[k], src[k]) for k in before)


def test_deep_sad_has_no_bias_and_no_affine_norm_anywhere():
    net = DeepSAD()
    assert not [n for n, _ in net.named_parameters() if "bias" in n]
    assert all(not m.affine for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_labeled_anomalies_end_farther_from_c_than_normals_and_scores_vary():
    """Untrained, the nearest anomaly sits at about the normals' median distance (ratio 0.96-1.05
    over three seeds); 20 steps take it past 30x, so 5x tells training from chance."""
    torch.manual_seed(0)
    normal = torch.rand(32, 3, 32, 32) * 0.3 + torch.tensor([0.6, 0.3, 0.3])[:, None, None]
    anomal = torch.rand(8, 3, 32, 32) * 0.3 + torch.tensor([0.2, 0.6, 0.3])[:, None, None]
    x = torch.cat([normal, anomal])
    semi = torch.cat([torch.zeros(32, dtype=torch.long), -torch.ones(8, dtype=torch.long)])
    net = DeepSAD()
    net.eval()
    with torch.no_grad():
        net.set_center(net(normal))
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=0.5e-6)
    for _ in range(20):
        opt.zero_grad()
        deep_sad_loss(net(x), net.c, semi).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        scores = net.score(x)
    assert scores[32:].min() > 5 * scores[:32].median()
    assert scores.std() > 1e-3  # not one constant score


def test_class_weights_are_n_over_two_n_c():
    labels = torch.tensor([0] * 27 + [1] * 3)
    assert class_weights(labels).tolist() == pytest.approx([30 / (2 * 27), 30 / (2 * 3)])


@pytest.mark.parametrize("size", [32, 224])
def test_classifier_gives_a_binary_logit_kind_logits_and_pooled_features(size):
    model = RegularityClassifier(ClassifierConfig(arch="resnest14d", input_size=size)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out["logit"].shape == (2,) and out["kind_logits"].shape == (2, 3)
    assert out["features"].shape == (2, model.backbone.num_features)
