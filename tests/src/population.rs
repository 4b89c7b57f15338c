//! Synthetic students for the demo and the load benchmark, shaped like the original service's
//! 804-user export (DOMAIN.md): women/men ≈ 54/46, ages with a mode at 20–21 and a long tail,
//! contact frequency normal/frequent/rare ≈ 65/26/9 %, 39 majors, 1–4 hobby categories.
//! Seeded: the same seed gives the same people.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const HOBBIES: [&str; 6] = ["sports", "arts", "culture", "travel", "daily_study", "game"];
const AXES: [(char, char); 4] = [('E', 'I'), ('S', 'N'), ('T', 'F'), ('J', 'P')];

pub struct Population {
    rng: StdRng,
}

impl Population {
    pub fn new(seed: u64) -> Population {
        Population {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn mbti(&mut self, letters: usize) -> String {
        let mut axes = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            let j = self.rng.random_range(0..=i);
            axes.swap(i, j);
        }
        let mut chosen: Vec<usize> = axes[..letters].to_vec();
        chosen.sort_unstable();
        chosen
            .into_iter()
            .map(|a| {
                if self.rng.random_bool(0.5) {
                    AXES[a].0
                } else {
                    AXES[a].1
                }
            })
            .collect()
    }

    /// One `PUT /api/v1/me/profile` body.
    pub fn profile(&mut self, n: usize) -> Value {
        let female = self.rng.random_bool(0.54);
        let age = match self.rng.random_range(0..100) {
            0..=34 => 20,
            35..=59 => 21,
            60..=74 => 22,
            75..=84 => 23,
            85..=89 => 19,
            _ => self.rng.random_range(24..=30),
        };
        let contact = match self.rng.random_range(0..100) {
            0..=64 => "normal",
            65..=90 => "frequent",
            _ => "rare",
        };
        let mut hobbies: Vec<&str> = Vec::new();
        for _ in 0..self.rng.random_range(1..=4) {
            let h = HOBBIES[self.rng.random_range(0..HOBBIES.len())];
            if !hobbies.contains(&h) {
                hobbies.push(h);
            }
        }
        let major = format!("Department {:02}", self.rng.random_range(1..=39));
        json!({
            "nickname": format!("student{n}"),
            "gender": if female { "female" } else { "male" },
            "age": age,
            "mbti": self.mbti(4),
            "hobbies": hobbies,
            "contact_frequency": contact,
            "major": major,
            "song": "Festival Song",
            "comment": "see you at the booth",
            "contact": {"kind": if n.is_multiple_of(2) { "kakao" } else { "instagram" }, "handle": format!("handle_{n}")},
            "dont_pick_me": self.rng.random_bool(0.02),
        })
    }

    /// One `POST /api/v1/matches` body shaped like the web app's: two MBTI letters from
    /// different axes, one hobby, often an important option, sometimes exclude-same-major.
    pub fn match_options(&mut self) -> Value {
        let age = ["younger", "equal", "older", "any"][self.rng.random_range(0..4)];
        let hobby = HOBBIES[self.rng.random_range(0..HOBBIES.len())];
        let contact = ["frequent", "normal", "rare", "any"][self.rng.random_range(0..4)];
        let mut important =
            ["none", "mbti", "hobby", "age", "contact_frequency"][self.rng.random_range(0..5)];
        if (important == "age" && age == "any")
            || (important == "contact_frequency" && contact == "any")
        {
            important = "none";
        }
        json!({
            "age": age,
            "mbti": self.mbti(2),
            "hobby": hobby,
            "contact_frequency": contact,
            "exclude_same_major": self.rng.random_bool(0.2),
            "important": important,
        })
    }

    pub fn pick(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
}
