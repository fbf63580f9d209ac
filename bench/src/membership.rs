//! Who is in which room, for `mesa-bench rooms`: every room has the same number of
//! members, spread over 1, 2, ... up to every replica (or fewer) in turn, so that most
//! rooms genuinely have members on only some replicas (what routing by interest saves).

/// The rooms of a run and their members. Connection `i` is on replica `i mod replicas`
/// (the generator's rule for repeated `--url`s).
pub(super) struct Membership {
    /// The number of replicas.
    replicas: usize,
    /// The members (connection indices) of each room.
    members: Vec<Vec<u32>>,
    /// The rooms (indices) of each connection.
    rooms_of: Vec<Vec<u32>>,
}

impl Membership {
    /// Put `members` connections in each of `rooms` rooms, `connections` connections
    /// spread over `replicas`. Room `r` has members on `1 + r mod max_spread` replicas
    /// (`max_spread` at most `replicas`; consecutive ones, starting at
    /// `(r / max_spread) mod replicas`, so that every replica holds the same share),
    /// split as evenly as possible; each replica hands
    /// its memberships to its connections in turn, so a connection is in about
    /// `rooms * members / connections` rooms and never twice in one. An error when a
    /// replica has fewer connections than one room needs there.
    pub(super) fn new(
        connections: u32,
        rooms: u32,
        members: u32,
        replicas: usize,
        max_spread: usize,
    ) -> Result<Self, String> {
        let replicas = replicas.max(1);
        let max_spread = max_spread.clamp(1, replicas);
        let local: Vec<Vec<u32>> = (0..replicas)
            .map(|replica| {
                (0..connections)
                    .filter(|i| *i as usize % replicas == replica)
                    .collect()
            })
            .collect();
        let mut next = vec![0_usize; replicas];
        let mut plan = Membership {
            replicas,
            members: Vec::with_capacity(rooms as usize),
            rooms_of: vec![Vec::new(); connections as usize],
        };
        for room in 0..rooms {
            let spread = 1 + room as usize % max_spread;
            let first = (room as usize / max_spread) % replicas;
            let (each, extra) = (members as usize / spread, members as usize % spread);
            let mut in_room = Vec::with_capacity(members as usize);
            for k in 0..spread {
                let replica = (first + k) % replicas;
                let here = each + usize::from(k < extra);
                let pool = &local[replica];
                if here > pool.len() {
                    return Err(format!(
                        "room {room} needs {here} members on replica {replica}, which has {} connections: \
                         use more connections or fewer members",
                        pool.len()
                    ));
                }
                for _ in 0..here {
                    let conn = pool[next[replica] % pool.len()];
                    next[replica] += 1;
                    in_room.push(conn);
                    plan.rooms_of[conn as usize].push(room);
                }
            }
            plan.members.push(in_room);
        }
        Ok(plan)
    }

    /// The name of room `room`.
    pub(super) fn name(room: u32) -> String {
        format!("bench:{room}")
    }

    /// The number of rooms.
    pub(super) fn rooms(&self) -> u32 {
        self.members.len() as u32
    }

    /// The members of `room` (connection indices).
    pub(super) fn members(&self, room: u32) -> &[u32] {
        &self.members[room as usize]
    }

    /// The rooms of connection `conn`.
    pub(super) fn rooms_of(&self, conn: u32) -> &[u32] {
        &self.rooms_of[conn as usize]
    }

    /// The memberships of all rooms together.
    pub(super) fn memberships(&self) -> u64 {
        self.members.iter().map(|m| m.len() as u64).sum()
    }

    /// The replicas that hold a member of `room`.
    pub(super) fn replicas_of(&self, room: u32) -> impl Iterator<Item = usize> + '_ {
        (0..self.replicas).filter(move |replica| {
            self.members(room)
                .iter()
                .any(|conn| *conn as usize % self.replicas == *replica)
        })
    }

    /// How many rooms have members on 1, 2, ... replicas (index 0: one replica).
    pub(super) fn spreads(&self) -> Vec<u64> {
        let mut counts = vec![0; self.replicas];
        for room in 0..self.rooms() {
            counts[self.replicas_of(room).count() - 1] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_spread_over_one_two_and_three_replicas_evenly() {
        let plan = Membership::new(300, 90, 10, 3, 3).expect("enough connections");
        assert_eq!(plan.memberships(), 900);
        assert_eq!(plan.spreads(), vec![30, 30, 30]);
        for room in 0..plan.rooms() {
            let mut members = plan.members(room).to_vec();
            members.sort_unstable();
            members.dedup();
            assert_eq!(members.len(), 10, "room {room}: distinct members");
            assert_eq!(plan.replicas_of(room).count(), 1 + room as usize % 3);
        }
        // 900 memberships over 300 connections: 3 each, the replicas equally loaded.
        assert!((0..300).all(|conn| plan.rooms_of(conn).len() == 3));
    }

    #[test]
    fn rooms_may_be_kept_on_one_replica_each() {
        let plan = Membership::new(300, 90, 10, 3, 1).expect("enough connections");
        assert_eq!(plan.spreads(), vec![90, 0, 0]);
        assert!((0..300).all(|conn| plan.rooms_of(conn).len() == 3));
    }

    #[test]
    fn one_replica_holds_every_room() {
        let plan = Membership::new(100, 100, 10, 1, 1).expect("enough connections");
        assert_eq!(plan.spreads(), vec![100]);
        assert!((0..100).all(|conn| plan.rooms_of(conn).len() == 10));
    }

    #[test]
    fn too_few_connections_is_an_error() {
        assert!(Membership::new(6, 3, 10, 3, 3).is_err());
    }
}
