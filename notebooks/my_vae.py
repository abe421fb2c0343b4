
import pyro, pyro.distributions as dist, torch
from torch import nn

class TutorialVAE(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.Softplus(),
                                     nn.Linear(hidden_dim, 64), nn.Sigmoid())
        self.encoder = nn.Sequential(nn.Linear(64, hidden_dim), nn.Softplus(),
                                     nn.Linear(hidden_dim, 2 * z_dim))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

def make(z_dim=2, hidden_dim=64):
    vae = TutorialVAE(z_dim, hidden_dim)
    return vae.model, vae.guide
