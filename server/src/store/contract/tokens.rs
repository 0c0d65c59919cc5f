//! Join tokens: each use is spent once, whoever races for it.

use super::{race, token, ContractBackend};
use crate::store::{TokenRedemption, TokenRefusal};

const NOW: i64 = 1_800_000_000;

pub(crate) async fn a_single_use_token_is_redeemed_once_under_a_race<B: ContractBackend>(store: B) {
    store
        .insert_token(&token("tok1", "hash1", 1))
        .await
        .unwrap();
    let redemptions = race(&store, 8, |store, _| async move {
        store.redeem_token("hash1", NOW).await.unwrap()
    })
    .await;
    let redeemed: Vec<_> = redemptions
        .iter()
        .filter_map(|redemption| match redemption {
            TokenRedemption::Redeemed(record) => Some(record),
            TokenRedemption::Refused(_) => None,
        })
        .collect();
    assert_eq!(redeemed.len(), 1, "{redemptions:?}");
    assert_eq!(redeemed[0].uses_done, 1);
    assert_eq!(redeemed[0].labels, super::labels());
    for redemption in &redemptions {
        if let TokenRedemption::Refused(refusal) = redemption {
            assert!(
                matches!(
                    refusal,
                    TokenRefusal::UsedUp {
                        uses_done: 1,
                        uses_allowed: 1,
                        ..
                    }
                ),
                "{refusal}"
            );
        }
    }
    assert_eq!(
        store.redeem_token("other", NOW).await.unwrap(),
        TokenRedemption::Refused(TokenRefusal::Unknown)
    );
}

pub(crate) async fn a_token_with_several_uses_is_spent_exactly_that_often_under_a_race<
    B: ContractBackend,
>(
    store: B,
) {
    store
        .insert_token(&token("tok1", "hash1", 3))
        .await
        .unwrap();
    let redemptions = race(&store, 8, |store, _| async move {
        store.redeem_token("hash1", NOW).await.unwrap()
    })
    .await;
    let mut uses: Vec<u32> = redemptions
        .iter()
        .filter_map(|redemption| match redemption {
            TokenRedemption::Redeemed(record) => Some(record.uses_done),
            TokenRedemption::Refused(_) => None,
        })
        .collect();
    uses.sort_unstable();
    assert_eq!(uses, [1, 2, 3], "each use counted once: {redemptions:?}");
    let spent = &store.list_tokens().await.unwrap()[0];
    assert_eq!(spent.uses_done, 3);
    assert_eq!(spent.last_used_at, Some(NOW), "its spent time");
    assert_eq!(spent.revoked_at, None);
}

pub(crate) async fn expired_and_revoked_tokens_are_refused_with_their_reason<B: ContractBackend>(
    store: B,
) {
    let expiring = token("tok1", "hash1", 5);
    store.insert_token(&expiring).await.unwrap();
    assert!(matches!(
        store
            .redeem_token("hash1", expiring.expires_at)
            .await
            .unwrap(),
        TokenRedemption::Refused(TokenRefusal::Expired { .. })
    ));
    store
        .insert_token(&token("tok2", "hash2", 5))
        .await
        .unwrap();
    let revoked = store.revoke_token("tok2", NOW).await.unwrap().unwrap();
    assert!(revoked.revoked);
    assert_eq!(revoked.revoked_at, Some(NOW));
    let again = store.revoke_token("tok2", NOW + 60).await.unwrap().unwrap();
    assert_eq!(
        again.revoked_at,
        Some(NOW),
        "the first revocation's time stays"
    );
    assert!(matches!(
        store.redeem_token("hash2", NOW).await.unwrap(),
        TokenRedemption::Refused(TokenRefusal::Revoked { .. })
    ));
    assert!(store.revoke_token("nope", NOW).await.unwrap().is_none());
    let ids: Vec<String> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|token| token.id)
        .collect();
    assert_eq!(ids, ["tok1", "tok2"]);
}
