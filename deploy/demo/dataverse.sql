-- Dataverse-like side: customer groups, transaction currencies, accounts
-- keyed by accountnumber (an alternate key: the primary keys are GUIDs),
-- contacts.
CREATE TABLE msdyn_customergroups (
    msdyn_customergroupid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    msdyn_groupid         text NOT NULL UNIQUE,
    msdyn_description     text,
    msdyn_paymentterm     text
);
CREATE TABLE transactioncurrencies (
    transactioncurrencyid uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    isocurrencycode       text NOT NULL UNIQUE,
    currencyname          text NOT NULL,
    currencysymbol        text
);
CREATE TABLE accounts (
    accountid               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    accountnumber           text NOT NULL UNIQUE,
    name                    text NOT NULL,
    msdyn_customergroupid   text REFERENCES msdyn_customergroups (msdyn_groupid),
    transactioncurrencycode text REFERENCES transactioncurrencies (isocurrencycode),
    creditlimit             numeric(14, 2),
    telephone1              text,
    emailaddress1           text,
    creditonhold            boolean NOT NULL DEFAULT false,
    modifiedon              timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE contacts (
    contactid             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    msdyn_contactpersonid text NOT NULL UNIQUE,
    parentcustomernumber  text REFERENCES accounts (accountnumber) ON DELETE CASCADE,
    firstname             text,
    lastname              text,
    emailaddress1         text
);
ALTER TABLE msdyn_customergroups REPLICA IDENTITY FULL;
ALTER TABLE transactioncurrencies REPLICA IDENTITY FULL;
ALTER TABLE accounts REPLICA IDENTITY FULL;
ALTER TABLE contacts REPLICA IDENTITY FULL;

INSERT INTO msdyn_customergroups (msdyn_groupid, msdyn_description, msdyn_paymentterm)
SELECT 'G' || lpad(g::text, 2, '0'), 'Customer group ' || g, 'Net' || (g % 3 + 1) * 15
FROM generate_series(1, 10) g;

INSERT INTO transactioncurrencies (isocurrencycode, currencyname, currencysymbol) VALUES
    ('EUR', 'Euro', '€'), ('USD', 'US dollar', '$'), ('GBP', 'Pound sterling', '£'),
    ('DKK', 'Danish krone', 'kr'), ('JPY', 'Japanese yen', '¥');

INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode,
                      creditlimit, telephone1, emailaddress1, creditonhold)
SELECT 'C' || lpad(i::text, 4, '0'),
       'Customer ' || i || ' Ltd',
       'G' || lpad((i % 10 + 1)::text, 2, '0'),
       (ARRAY['EUR', 'USD', 'GBP', 'DKK', 'JPY'])[i % 5 + 1],
       (i * 1000)::numeric(14, 2),
       '+45 ' || (10000000 + i),
       'ap' || i || '@customer' || i || '.example',
       i % 17 = 0
FROM generate_series(1, 300) i;

INSERT INTO contacts (msdyn_contactpersonid, parentcustomernumber, firstname, lastname, emailaddress1)
SELECT 'P' || lpad(i::text, 4, '0'), 'C' || lpad(i::text, 4, '0'), 'First' || i, 'Last' || i,
       'contact' || i || '@customer' || i || '.example'
FROM generate_series(1, 300) i;
